"""The model service of a multi-tenant worker: isolation, sharing and quotas around ModelService.

Used only with a tenants file (single-tenant workers run the plain ModelService).

- Every job runs inside `policy.scope(tenant)`: local folders are checked against the
  tenant's roots, hub calls carry the tenant's token or none (never the worker's).
- Private models (local folders, unpinned or token-needing repos, remote code) get a
  model key that includes the tenant: another tenant's identical load is a new model.
- A public hub repo at a pinned commit is loaded once and shared: its entry's tenant is
  '*', `shared_by` lists the tenants using it, and each tenant's quotas count it.
- Adapter names are namespaced internally as `NAME@TENANT` ('@' is in no tenant or adapter
  name), so tenants attach 'default' to one shared base without clashing; records show a
  tenant only its own adapters, with their plain names. peft keeps one active adapter per
  model: on a shared base the last activated wins, so inference must pick its adapter.
- Unloading a shared base drops the tenant's adapters and its use; the memory is freed
  when the last tenant unloads.
"""

from __future__ import annotations

import logging

from schemas import AttachAdapterJob, DType, LoadJob, ModelInfo, UnloadJob
from schemas.errors import AccessDenied, ModelNotFound, RemoteCodeNotAllowed
from schemas.tenants import Tenant
from tasks.tenants import Tenants
from worker import loader
from worker.admission import Admission
from worker.cache import Entry, ModelCache
from worker.policy import check_quota, current, hub_token, is_shareable, scope
from worker.progress import Reporter
from worker.resolve import Source
from worker.service import ModelService, WorkerSpot

log = logging.getLogger(__name__)

SHARED = "*"
"""The tenant of a shared base's cache entry."""


def internal_name(name: str, tenant: str) -> str:
    return f"{name}@{tenant}"


def visible(names: tuple[str, ...], tenant: str, private: bool) -> tuple[str, ...]:
    """The adapter names `tenant` sees: its own, without the namespace."""
    suffix = f"@{tenant}"
    out = [n.removesuffix(suffix) for n in names if n.endswith(suffix)]
    return tuple(out + ([n for n in names if "@" not in n] if private else []))


class TenantModelService(ModelService):
    """ModelService with the rules of the tenants file applied to every job."""

    def __init__(self, cache: ModelCache, spot: WorkerSpot, tenants: Tenants,
                 admission: Admission | None = None) -> None:
        super().__init__(cache, spot, admission)
        self.tenants = tenants

    # --- jobs ------------------------------------------------------------------------

    def load(self, job: LoadJob, reporter: Reporter) -> ModelInfo:
        tenant = self.tenants.get_tenant(job.tenant)
        if job.trust_remote_code and not tenant.allow_remote_code:
            raise RemoteCodeNotAllowed(
                f"tenant {tenant.name!r} may not run a repo's own code (allow_remote_code is off "
                "in the tenants file): use a built-in architecture or ask the operator",
                tenant=tenant.name)
        spaced = job.model_copy(update={
            "adapters": tuple(a.model_copy(update={"name": internal_name(a.name or "default",
                                                                        tenant.name)})
                              for a in job.adapters),
            "active_adapter": None if job.active_adapter is None
            else internal_name(job.active_adapter, tenant.name)})
        with scope(tenant):
            info = super().load(spaced, reporter)
        entry = self.cache.get(info.model_key)
        assert entry is not None
        if is_shareable(job, tenant) and entry.base.repo_id == job.model.repo_id:
            entry.tenant = SHARED
            entry.shared_by.add(tenant.name)
        if not info.cache_hit:
            self._check_after_load(tenant, entry)
        return self._view(info, entry, tenant.name)

    def cached(self, job: LoadJob) -> ModelInfo | None:
        """Never: a tenant's load runs in full, under its roots, quotas and sharing rules."""
        return None

    def attach(self, job: AttachAdapterJob, reporter: Reporter) -> ModelInfo:
        tenant = self.tenants.get_tenant(job.tenant)
        entry = self._resident(job.model_key, tenant.name)
        if entry.tenant == SHARED and tenant.name not in entry.shared_by:
            self._check_quota(tenant, entry.bytes)
        with scope(tenant):
            info = super().attach(job.model_copy(update={"name": internal_name(job.name,
                                                                               tenant.name)}),
                                  reporter)
        if entry.tenant == SHARED:
            entry.shared_by.add(tenant.name)
        return self._view(info, entry, tenant.name)

    def unload(self, job: UnloadJob, reporter: Reporter) -> ModelInfo:
        tenant = self.tenants.get_tenant(job.tenant)
        entry = self._resident(job.model_key, tenant.name)
        if entry.tenant != SHARED:
            return self._view(super().unload(job, reporter), entry, tenant.name)
        if tenant.name not in entry.shared_by:
            raise ModelNotFound(f"tenant {tenant.name!r} does not use model {job.model_key}: "
                                "nothing to unload", model_key=job.model_key)
        suffix = f"@{tenant.name}"
        self._detach(entry, [n for n in entry.adapters if n.endswith(suffix)])
        entry.shared_by.discard(tenant.name)
        info = self._view(entry.info, entry, tenant.name)
        if not entry.shared_by:
            self.cache.remove(entry.key)
        else:
            entry.info = self._info(entry, True, 0.0)
        return info

    # --- hooks -------------------------------------------------------------------------

    def token(self) -> str | bool | None:
        active = current()
        return None if active is None else hub_token(active.tenant)

    def base_identity(self, base: Source, job: LoadJob) -> str:
        """Shared for a public pinned repo, else per tenant; checks quotas before loading."""
        tenant = self.tenants.get_tenant(job.tenant)
        shared = is_shareable(job, tenant) and base.repo_id == job.model.repo_id
        identity = base.identity if shared else f"{base.identity}|tenant:{tenant.name}"
        entry = self.cache.get(loader.model_key(identity, job))
        if entry is None:
            plain = job.dtype is DType.auto and not job.quantization.quantized
            self._check_quota(tenant, _weights_bytes(base) if plain else 0)
        elif entry.tenant == SHARED and tenant.name not in entry.shared_by:
            self._check_quota(tenant, entry.bytes)
        return identity

    def _resident(self, key: str, tenant: str) -> Entry:
        entry = self.cache.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key} is not resident on worker {self.spot.name}: load it "
                                "first (`modelq ls` lists resident models)", model_key=key)
        if entry.tenant not in (tenant, SHARED):
            raise AccessDenied(f"model {key} belongs to another tenant: load your own copy",
                               model_key=key, tenant=tenant)
        return entry

    # --- quotas and views --------------------------------------------------------------

    def _usage(self, tenant: str, skip: str | None = None) -> tuple[int, int]:
        mine = [e for e in self.cache.entries()
                if e.key != skip and (e.tenant == tenant or tenant in e.shared_by)]
        return len(mine), sum(e.bytes for e in mine)

    def _check_quota(self, tenant: Tenant, adding: int) -> None:
        models, used = self._usage(tenant.name)
        check_quota(tenant, models=models, resident_bytes=used, adding_bytes=adding)

    def _check_after_load(self, tenant: Tenant, entry: Entry) -> None:
        models, used = self._usage(tenant.name, skip=entry.key)
        try:
            check_quota(tenant, models=models, resident_bytes=used, adding_bytes=entry.bytes)
        except Exception:
            self.cache.remove(entry.key)
            raise

    @staticmethod
    def _view(info: ModelInfo, entry: Entry, tenant: str) -> ModelInfo:
        private = entry.tenant != SHARED
        return info.model_copy(update={
            "adapters": visible(info.adapters, tenant, private),
            "active_adapters": visible(info.active_adapters, tenant, private)})


def _weights_bytes(base: Source) -> int:
    """The size of the base's weight files: what an unquantized load will roughly take."""
    return sum(p.stat().st_size for p in base.path.glob("*.safetensors"))
