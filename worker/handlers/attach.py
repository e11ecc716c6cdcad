"""The attach and unload handlers: change what is attached to, or resident in, a worker's cache.

On a shared base (a public repo at a pinned commit, tenant '*'), a tenant that attaches
starts using it (its quota counts the base); unloading drops the tenant's adapters and its
use, and the memory is freed when the last tenant unloads.
"""

from __future__ import annotations

import time

from schemas import AdapterSpec, AttachAdapterJob, ModelInfo, ModelNotFound, Stage, UnloadJob
from schemas.tenants import SHARED_TENANT
from tasks.state.model_specs import ModelSpecs
from worker.handlers import Handler
from worker.jobs.progress import Reporter
from worker.models.cache import release_memory
from worker.models.residents import Residents


class AttachHandler(Handler):
    """Attaches an adapter to a resident model (and, on a private model, to its load spec:
    a load from the spec attaches it too)."""

    def __init__(self, residents: Residents, specs: ModelSpecs | None = None) -> None:
        self.residents = residents
        self.specs = specs

    def ref(self, job: AttachAdapterJob) -> str:
        return job.adapter.display

    def run(self, job: AttachAdapterJob, reporter: Reporter) -> ModelInfo:
        residents, policy, tenant = self.residents, self.residents.policy, job.tenant
        started = time.monotonic()
        entry = residents.owned(job.model_key, tenant)
        joins = entry.tenant == SHARED_TENANT and tenant not in entry.shared_by
        if joins:
            policy.check_quota(tenant, residents.cache.entries(), adding=entry.bytes)
        residents.attach(entry, job.adapter, policy.adapter_name(job.name, tenant), reporter,
                         policy.access(tenant), activate=job.activate)
        if joins:
            entry.shared_by.add(tenant)
        if self.specs is not None and entry.tenant != SHARED_TENANT:
            self.specs.add_adapters(job.model_key, (AdapterSpec(ref=job.adapter, name=job.name),),
                                    job.name if job.activate else None)
        entry.info = residents.info(entry, True, time.monotonic() - started)
        return policy.view(entry.info, entry, tenant)


class UnloadHandler(Handler):
    """Frees a resident model, or detaches one adapter from it. A model freed on purpose
    takes its load spec along (tasks/state/model_specs.py): a run job naming it is not found."""

    def __init__(self, residents: Residents, specs: ModelSpecs | None = None) -> None:
        self.residents = residents
        self.specs = specs

    def ref(self, job: UnloadJob) -> str:
        return job.model_key

    def run(self, job: UnloadJob, reporter: Reporter) -> ModelInfo:
        residents, policy, tenant = self.residents, self.residents.policy, job.tenant
        entry = residents.owned(job.model_key, tenant)
        if job.adapter is not None:
            name = policy.adapter_name(job.adapter, tenant)
            if name not in entry.adapters:
                mine = [n for n in policy.view(entry.info, entry, tenant).adapters]
                raise ModelNotFound(f"model {job.model_key} has no adapter named {job.adapter!r} "
                                    f"(attached: {', '.join(mine) or 'none'})",
                                    model_key=job.model_key, adapter=job.adapter)
            reporter.stage(Stage.unloading, f"detaching {job.adapter!r} from {entry.base.ref}")
            residents.detach(entry, [name])
            if self.specs is not None and entry.tenant != SHARED_TENANT:
                self.specs.drop_adapter(job.model_key, job.adapter)
            release_memory()
            entry.info = residents.info(entry, True, 0.0)
            return policy.view(entry.info, entry, tenant)
        if entry.tenant != SHARED_TENANT:
            reporter.stage(Stage.unloading, f"freeing {entry.base.ref}")
            info = policy.view(entry.info, entry, tenant)
            residents.cache.remove(job.model_key)
            self._forget(job.model_key)
            return info
        if tenant not in entry.shared_by:
            raise ModelNotFound(f"tenant {tenant!r} does not use model {job.model_key}: "
                                "nothing to unload", model_key=job.model_key)
        residents.detach(entry, policy.tenant_adapters(entry, tenant))
        entry.shared_by.discard(tenant)
        info = policy.view(entry.info, entry, tenant)
        if not entry.shared_by:
            residents.cache.remove(entry.key)
            self._forget(entry.key)
        else:
            entry.info = residents.info(entry, True, 0.0)
        return info

    def _forget(self, key: str) -> None:
        if self.specs is not None:
            self.specs.forget(key, self.residents.identity.name)
