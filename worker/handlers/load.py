"""The load handler: resolve a model, load it into the cache (or find it there), attach adapters.

A load either completes or leaves the cache as it found it: a fresh model whose adapter
fails is dropped; adapters a failed job attached to a cached model are removed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from schemas import AdapterSpec, Cancelled, DType, LoadJob, ModelInfo, ModelRef, RunResult, Stage
from schemas.errors import ModelqError
from schemas.tenants import SHARED_TENANT
from tasks.state.model_specs import ModelSpecs
from tasks.state.registry import request_key
from worker.access import Access
from worker.errors import translate
from worker.handlers import Claim, Handler
from worker.jobs.progress import Reporter
from worker.models import adapters, estimate, loader
from worker.models.admission import Admission
from worker.models.cache import Entry, release_memory
from worker.models.placement import Placements
from worker.models.residents import Residents
from worker.models.resolve import Resolved, Source, resolve


class LoadHandler(Handler):
    """Runs load jobs against one worker's cache."""

    def __init__(self, residents: Residents, admission: Admission,
                 claim: Callable[[LoadJob], Claim] | None = None,
                 placements: Placements | None = None, specs: ModelSpecs | None = None) -> None:
        self.residents = residents
        self.placements = placements or Placements()  # strategies resolved to maps: one key per map
        self.cache = residents.cache
        self.policy = residents.policy
        self.admission = admission
        self._claim = claim
        self.specs = specs  # load specs by model key: a key outlives its worker

    def opening(self, job: LoadJob) -> tuple[Stage, str]:
        return Stage.resolving, f"resolving {job.model.display}"

    def ref(self, job: LoadJob) -> str:
        return job.model.display

    def timeout(self, job: LoadJob) -> float | None:
        return job.timeout_seconds

    def claims(self, job: LoadJob) -> list[Claim]:
        return [self._claim(job)] if self._claim is not None else []

    def run(self, job: LoadJob, reporter: Reporter) -> ModelInfo:
        access = self.policy.access(job.tenant)
        self.policy.check_job(job)
        try:
            entry, cache_hit, info = self._load(self._spaced(job), reporter, access)
        finally:
            self.cache.busy = None  # idle again: evictable and subject to keep-alive
        self._keep_spec(job, entry, fresh=not cache_hit)
        return self.policy.view(info, entry, job.tenant)

    def _keep_spec(self, job: LoadJob, entry: Entry, *, fresh: bool) -> None:
        """The spec that made a fresh model, kept under its key (worker/handlers/respawn.py);
        a hit renews it and adds the adapters it attached. A shared base's spec has no
        adapters: they are its tenants'."""
        if self.specs is None:
            return
        if not fresh:
            self.specs.touch(entry.key)
            if job.adapters and entry.tenant != SHARED_TENANT:  # attached now: kept with it
                self.specs.add_adapters(entry.key, job.adapters, job.active_adapter)
            return
        spec = job.model_copy(update={"placement": entry.placement or job.placement})
        if entry.tenant == SHARED_TENANT:
            spec = spec.model_copy(update={"adapters": (), "active_adapter": None})
        self.specs.remember(entry.key, entry.tenant, spec)

    def _spaced(self, job: LoadJob) -> LoadJob:
        """The job with its adapters named as they are on the model (tenant namespaces)."""
        name = self.policy.adapter_name
        return job.model_copy(update={
            "adapters": tuple(a.model_copy(update={"name": name(a.name or "default", job.tenant)})
                              for a in job.adapters),
            "active_adapter": None if job.active_adapter is None
            else name(job.active_adapter, job.tenant)})

    def _load(self, job: LoadJob, reporter: Reporter, access: Access) -> tuple[Entry, bool, ModelInfo]:
        started = time.monotonic()
        reporter.stage(Stage.resolving, f"resolving {job.model.display}")
        if job.model.repo_id is not None:
            reporter.stage(Stage.downloading, f"fetching {job.model.display}")
        resolved = resolve(job.model, trust_remote_code=job.trust_remote_code, access=access,
                           tqdm_class=reporter.tqdm_class())
        check_cancel(reporter)
        device = self.residents.identity.local_device
        placed = self.placements.concrete(resolved, job, device)  # keyed and loaded by its map
        key = loader.model_key(self.policy.identity(resolved.base, job), placed, device)
        self.cache.busy = key
        entry = self.cache.get(key)
        cache_hit = entry is not None
        if entry is None:
            plain = job.dtype is DType.auto and not job.quantization.quantized
            self._charge(job.tenant, estimate.weights_bytes(resolved.base.path) if plain else 0)
            entry = self._load_new(key, resolved, placed, reporter, access)
        elif entry.tenant == SHARED_TENANT and job.tenant not in entry.shared_by:
            self._charge(job.tenant, entry.bytes)
        attached = self._attach_all(entry, resolved, job, reporter, access, fresh=not cache_hit)
        entry.pinned = entry.pinned or job.pin
        entry.keep_alive = job.keep_alive_seconds if job.keep_alive_seconds else entry.keep_alive
        entry.request_keys.add(request_key(job))
        entry.info = self.residents.info(entry, cache_hit, time.monotonic() - started,
                                         measure=bool(attached))
        self.cache.put(entry)
        if entry.tenant == SHARED_TENANT:
            entry.shared_by.add(job.tenant)
        if not cache_hit:  # measured now: the tenant's quota counts what the model really took
            try:
                self._charge(job.tenant, entry.bytes, skip=entry.key)
            except ModelqError:
                self.cache.remove(entry.key)
                raise
        return entry, cache_hit, entry.info

    def _charge(self, tenant: str, adding: int, skip: str | None = None) -> None:
        """The tenant's quota check (worker/policy.py) for a model it takes into use."""
        self.policy.check_quota(tenant, self.cache.entries(), adding=adding, skip=skip)

    def _load_new(self, key: str, resolved: Resolved, job: LoadJob, reporter: Reporter,
                  access: Access) -> Entry:
        reporter.stage(Stage.loading, f"loading {resolved.base.ref}")
        try:
            admitted = self.admission.load(resolved, job, reporter, access=access)
        except ModelqError:
            raise
        except Exception as exc:
            release_memory()
            raise translate(exc, ref=resolved.base.ref) from exc
        entry = self.residents.new_entry(key, admitted.model, resolved.base, job)
        entry.info = entry.info.model_copy(update={"estimated_bytes": admitted.estimated_bytes,
                                                   "from_artifact": admitted.from_artifact})
        if reporter.cancelled():
            entry.model = None  # type: ignore[assignment]
            release_memory()
            raise Cancelled("cancelled after loading; the model was freed")
        return entry

    def _attach_all(self, entry: Entry, resolved: Resolved, job: LoadJob, reporter: Reporter,
                    access: Access, *, fresh: bool) -> list[str]:
        """Attach the job's adapters (the ref's own first); undone whole if one fails."""
        wanted = list(job.adapters)
        if resolved.adapter is not None:
            wanted.insert(0, AdapterSpec(ref=ModelRef.model_validate(ref_of(resolved.adapter)),
                                         name=self.policy.adapter_name("default", job.tenant)))
        attached: list[str] = []
        try:
            for spec in wanted:
                check_cancel(reporter)
                name = spec.name or "default"
                own = resolved.adapter if spec.ref == ref_of(resolved.adapter) else None
                if self.residents.attach(entry, spec.ref, name, reporter, access, source=own,
                                         activate=True):
                    attached.append(name)
            if job.active_adapter is not None:
                adapters.activate(entry.model, job.active_adapter)
        except BaseException:
            if fresh:
                entry.model = None  # type: ignore[assignment]
                release_memory()
            else:
                self.residents.detach(entry, attached)
            raise
        return attached

    def cached(self, job: LoadJob) -> ModelInfo | None:
        """What a load of a local folder gets when this cache already serves it exactly as
        asked (nothing to load, attach, activate, pin or keep alive); None when the job must
        run in full (a tenant's load always does, under its roots, quotas and sharing rules).
        Changes nothing: `served` records the hit once the job's record says so."""
        started = time.monotonic()
        if (self.policy.multi or job.model.path is None or job.adapters
                or job.active_adapter is not None or job.pin or job.keep_alive_seconds):
            return None
        wanted = request_key(job)
        if not any(wanted in entry.request_keys for entry in self.cache.entries()):
            return None  # no resident model has served this load: a cold load resolves once
        resolved = resolve(job.model, trust_remote_code=job.trust_remote_code,
                           access=self.policy.access(job.tenant))
        if resolved.adapter is not None:
            return None
        device = self.residents.identity.local_device
        placed = self.placements.concrete(resolved, job, device)
        entry = self.cache.peek(loader.model_key(resolved.base.identity, placed, device))
        if entry is None or wanted not in entry.request_keys:  # the folder changed since
            return None
        return self.residents.info(entry, True, time.monotonic() - started, measure=False)

    def served(self, result: ModelInfo | RunResult) -> None:
        entry = self.cache.get(result.model_key)
        if entry is not None and isinstance(result, ModelInfo):
            entry.info = result


def ref_of(source: Source | None) -> ModelRef | None:
    """A resolved folder as a ref again (None for None)."""
    if source is None:
        return None
    if source.repo_id is not None:
        return ModelRef(repo_id=source.repo_id, revision=source.revision)
    return ModelRef(path=str(source.path))


def check_cancel(reporter: Reporter) -> None:
    if reporter.cancelled():
        raise Cancelled("cancelled on request")
