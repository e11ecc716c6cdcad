"""What a worker does for each job kind: load, attach, unload, against its model cache.

No Redis here: the runner hands in a Reporter and turns the result into a record.
A job either completes or leaves the cache as it found it (a fresh model whose
adapter fails is dropped; adapters a failed job attached to a cached model are removed).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from schemas import (
    AdapterSpec,
    AttachAdapterJob,
    BaseModelInfo,
    Cancelled,
    LoadJob,
    ModelInfo,
    ModelNotFound,
    ModelRef,
    Stage,
    UnloadJob,
)
from schemas.errors import AdapterIncompatible, InvalidJob, ModelqError
from tasks.registry import request_key
from worker import adapters, loader
from worker.admission import Admission
from worker.cache import Entry, ModelCache, release_memory
from worker.errors import translate
from worker.progress import Reporter
from worker.resolve import ADAPTER_CONFIG, CONFIG, Source, base_of, fetch, read_json, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpot:
    """Who is doing the work: the worker's name, its device as configured and as torch sees it."""

    name: str
    device: str  # as given to `modelq worker --device` (cuda:3)
    local_device: str  # as torch sees it after pinning (cuda:0) or cpu


class ModelService:
    """Runs load, attach and unload jobs against one worker's cache."""

    def __init__(self, cache: ModelCache, spot: WorkerSpot, admission: Admission | None = None) -> None:
        self.cache = cache
        self.spot = spot
        self.admission = admission or Admission(cache, spot.local_device)

    def load(self, job: LoadJob, reporter: Reporter) -> ModelInfo:
        try:
            return self._load(job, reporter)
        finally:
            self.cache.busy = None  # idle again: evictable and subject to keep-alive

    def _load(self, job: LoadJob, reporter: Reporter) -> ModelInfo:
        started = time.monotonic()
        reporter.stage(Stage.resolving, f"resolving {job.model.display}")
        if job.model.repo_id is not None:
            reporter.stage(Stage.downloading, f"fetching {job.model.display}")
        resolved = resolve(job.model, trust_remote_code=job.trust_remote_code, token=self.token(),
                           tqdm_class=reporter.tqdm_class())
        _check_cancel(reporter)
        key = loader.model_key(self.base_identity(resolved.base, job), job)
        self.cache.busy = key
        entry = self.cache.get(key)
        cache_hit = entry is not None
        if entry is None:
            reporter.stage(Stage.loading, f"loading {resolved.base.ref}")
            try:
                admitted = self.admission.load(resolved, job, reporter, token=self.token())
            except ModelqError:
                raise
            except Exception as exc:
                release_memory()
                raise translate(exc, ref=resolved.base.ref) from exc
            entry = self._entry(key, admitted.model, resolved.base, job)
            entry.info = entry.info.model_copy(update={"estimated_bytes": admitted.estimated_bytes,
                                                       "from_artifact": admitted.from_artifact})
            if reporter.cancelled():
                entry.model = None  # type: ignore[assignment]
                release_memory()
                raise Cancelled("cancelled after loading; the model was freed")
        wanted = list(job.adapters)
        if resolved.adapter is not None:
            wanted.insert(0, AdapterSpec(ref=_ref_of(resolved.adapter), name=None))
        attached: list[str] = []
        try:
            for spec in wanted:
                _check_cancel(reporter)
                name = spec.name or "default"
                source = resolved.adapter if spec.ref == _ref_of_or_none(resolved.adapter) else None
                if self._attach(entry, spec.ref, name, reporter, source=source, activate=True):
                    attached.append(name)
            if job.active_adapter is not None:
                adapters.activate(entry.model, job.active_adapter)
        except BaseException:
            if not cache_hit:
                entry.model = None  # type: ignore[assignment]
                release_memory()
            else:
                self._detach(entry, attached)
            raise
        entry.pinned = entry.pinned or job.pin
        entry.keep_alive = job.keep_alive_seconds if job.keep_alive_seconds else entry.keep_alive
        entry.request_keys.add(request_key(job))
        entry.info = self._info(entry, cache_hit, time.monotonic() - started, measure=bool(attached))
        self.cache.put(entry)
        return entry.info

    def cached(self, job: LoadJob) -> ModelInfo | None:
        """What a load of a local folder gets when this cache already serves it exactly as
        asked (nothing to load, attach, activate, pin or keep alive); None when the job must
        run in full. Changes nothing: `served` records the hit once the job's record says so."""
        started = time.monotonic()
        if (job.model.path is None or job.adapters or job.active_adapter is not None or job.pin
                or job.keep_alive_seconds):
            return None
        wanted = request_key(job)
        if not any(wanted in entry.request_keys for entry in self.cache.entries()):
            return None  # no resident model has served this load: a cold load resolves once
        resolved = resolve(job.model, trust_remote_code=job.trust_remote_code, token=self.token())
        if resolved.adapter is not None:
            return None
        entry = self.cache.peek(loader.model_key(self.base_identity(resolved.base, job), job))
        if entry is None or wanted not in entry.request_keys:  # the folder changed since
            return None
        return self._info(entry, True, time.monotonic() - started, measure=False)

    def served(self, info: ModelInfo) -> None:
        """A job was served from the cache with `info` (from `cached`): the entry was just used."""
        entry = self.cache.get(info.model_key)
        if entry is not None:
            entry.info = info

    def attach(self, job: AttachAdapterJob, reporter: Reporter) -> ModelInfo:
        started = time.monotonic()
        entry = self._resident(job.model_key, job.tenant)
        self._attach(entry, job.adapter, job.name, reporter, activate=job.activate)
        entry.info = self._info(entry, True, time.monotonic() - started)
        return entry.info

    def unload(self, job: UnloadJob, reporter: Reporter) -> ModelInfo:
        entry = self._resident(job.model_key, job.tenant)
        if job.adapter is not None:
            if job.adapter not in entry.adapters:
                raise ModelNotFound(f"model {job.model_key} has no adapter named {job.adapter!r} "
                                    f"(attached: {', '.join(entry.adapters) or 'none'})",
                                    model_key=job.model_key, adapter=job.adapter)
            reporter.stage(Stage.unloading, f"detaching {job.adapter!r} from {entry.base.ref}")
            self._detach(entry, [job.adapter])
            release_memory()
            entry.info = self._info(entry, True, 0.0)
            return entry.info
        reporter.stage(Stage.unloading, f"freeing {entry.base.ref}")
        info = entry.info
        self.cache.remove(job.model_key)
        return info

    # --- tenant hooks (worker/tenancy.py overrides them for multi-tenant pools) ----------

    def token(self) -> str | bool | None:
        """The hub token for the running job's tenant; None: huggingface_hub's own default."""
        return None

    def base_identity(self, base: Source, job: LoadJob) -> str:
        """What a model key is built from; a hook to keep private models apart per tenant."""
        return base.identity

    # --- helpers -----------------------------------------------------------------------

    def _resident(self, key: str, tenant: str) -> Entry:
        entry = self.cache.get(key)
        if entry is None or entry.tenant != tenant:
            raise ModelNotFound(f"model {key} is not resident on worker {self.spot.name}: load it "
                                "first (`modelq ls` lists resident models)", model_key=key)
        return entry

    def _attach(self, entry: Entry, ref: ModelRef, name: str, reporter: Reporter, *,
                activate: bool, source: Source | None = None) -> bool:
        """Attach `ref` as `name`; False when that very adapter is already attached."""
        reporter.stage(Stage.attaching, f"attaching {ref.display} as {name!r}")
        source = source or fetch(ref, token=self.token(), tqdm_class=reporter.tqdm_class())
        if entry.adapters.get(name) == source.identity:
            if activate:
                adapters.activate(entry.model, name)
            return False
        if name in entry.adapters:
            raise InvalidJob(f"adapter name {name!r} is taken on model {entry.key} by another "
                             "adapter: pick another name", name=name)
        _check_base(entry.base, source)
        entry.model = adapters.attach(entry.model, source, name, activate=activate)
        entry.adapters[name] = source.identity
        return True

    def _detach(self, entry: Entry, names: list[str]) -> None:
        for name in names:
            try:
                entry.model.delete_adapter(name)
            except Exception:  # the model stays usable; the name is dropped regardless
                log.exception("could not remove adapter %s from %s", name, entry.key)
            entry.adapters.pop(name, None)

    def _entry(self, key: str, model: torch.nn.Module, base: Source, job: LoadJob) -> Entry:
        measured = loader.measure(model)
        info = ModelInfo(
            model_key=key, model_class=type(model).__name__,
            base_model=BaseModelInfo(ref=base.ref, revision=base.revision, path=str(base.path),
                                     fingerprint=base.fingerprint),
            num_parameters=measured.parameters, footprint_bytes=measured.footprint,
            dtype=str(model.dtype).removeprefix("torch."),
            quantization=job.quantization.method.value,
            quantized_modules=measured.quantized_modules,
            device_map=loader.device_summary(model, self.spot.device))
        return Entry(key=key, model=model, info=info, base=base, tenant=job.tenant,
                     bytes=info.footprint_bytes)

    def _info(self, entry: Entry, cache_hit: bool, seconds: float, *,
              measure: bool = True) -> ModelInfo:
        """The entry's ModelInfo now; `measure` False reuses its bytes (nothing attached since taken)."""
        attached, active = adapters.names(entry.model)
        footprint = loader.footprint(entry.model) if measure else entry.bytes
        entry.bytes = footprint
        return entry.info.model_copy(update={
            "adapters": attached, "active_adapters": active, "footprint_bytes": footprint,
            "worker": self.spot.name, "device": self.spot.device, "cache_hit": cache_hit,
            "load_seconds": round(seconds, 4), "pinned": entry.pinned,
            "keep_alive_seconds": entry.keep_alive})


def _check_base(base: Source, adapter: Source) -> None:
    """AdapterIncompatible when the adapter names a base that is clearly not `base`.

    Same hub repo, or a folder with the same config.json, counts as the same base;
    when the declared base can't be compared here, peft's own shape checks decide.
    """
    name = read_json(adapter.path / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not name:
        return
    declared = base_of(adapter.ref, str(name))
    if declared.repo_id is not None:
        same = base.repo_id is None or base.repo_id == declared.repo_id
    else:
        path = Path(os.path.expanduser(str(declared.path))).resolve()
        same = (path == base.path or not (path / CONFIG).is_file()
                or read_json(path / CONFIG) == read_json(base.path / CONFIG))
    if not same:
        raise AdapterIncompatible(
            f"adapter {adapter.ref} was trained on {name}, but the model is {base.ref}: load "
            f"{name} and attach it there", ref=adapter.ref, declared_base=str(name))


def _ref_of(source: Source) -> ModelRef:
    if source.repo_id is not None:
        return ModelRef(repo_id=source.repo_id, revision=source.revision)
    return ModelRef(path=str(source.path))


def _ref_of_or_none(source: Source | None) -> ModelRef | None:
    return None if source is None else _ref_of(source)


def _check_cancel(reporter: Reporter) -> None:
    if reporter.cancelled():
        raise Cancelled("cancelled on request")
