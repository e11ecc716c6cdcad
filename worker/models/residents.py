"""The resident models of one worker as the job handlers use them: find, attach, detach, describe.

`Residents` joins the model cache, the worker's identity and the tenant policy; the
handlers (worker/handlers/) call it for what load, attach, unload and run jobs share.
No Redis here, and no job records: a handler returns a result, the runner records it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from schemas import BaseModelInfo, LoadJob, ModelInfo, ModelRef, Stage
from schemas.errors import AdapterIncompatible, InvalidJob
from worker.access import Access
from worker.device import WorkerIdentity
from worker.jobs.progress import Reporter
from worker.models import adapters, loader
from worker.models.cache import Entry, ModelCache
from worker.models.resolve import ADAPTER_CONFIG, CONFIG, Source, base_of, fetch, read_json
from worker.policy import TenantPolicy

log = logging.getLogger(__name__)


class Residents:
    """One worker's cache, seen through its identity and its tenant policy."""

    def __init__(self, cache: ModelCache, identity: WorkerIdentity, policy: TenantPolicy) -> None:
        self.cache = cache
        self.identity = identity
        self.policy = policy

    def owned(self, key: str, tenant: str) -> Entry:
        """The resident model `key` if `tenant` may use it (ModelNotFound / AccessDenied)."""
        return self.policy.owned(self.cache.get(key), key, tenant, self.identity.name)

    def attach(self, entry: Entry, ref: ModelRef, name: str, reporter: Reporter, access: Access, *,
               activate: bool, source: Source | None = None) -> bool:
        """Attach `ref` as `name` (the name on the model); False when that very adapter is
        already attached there (then only activated, if asked)."""
        reporter.stage(Stage.attaching, f"attaching {ref.display} as {name!r}")
        source = source or fetch(ref, access=access, tqdm_class=reporter.tqdm_class())
        if entry.adapters.get(name) == source.identity:
            if activate:
                adapters.activate(entry.model, name)
            return False
        if name in entry.adapters:
            raise InvalidJob(f"adapter name {name!r} is taken on model {entry.key} by another "
                             "adapter: pick another name", name=name)
        check_base(entry.base, source)
        entry.model = adapters.attach(entry.model, source, name, activate=activate)
        entry.adapters[name] = source.identity
        return True

    def detach(self, entry: Entry, names: list[str]) -> None:
        """Remove adapters from a resident model; the names are dropped even if peft fails."""
        for name in names:
            try:
                entry.model.delete_adapter(name)  # type: ignore[operator]
            except Exception:  # the model stays usable; the name is dropped regardless
                log.exception("could not remove adapter %s from %s", name, entry.key)
            entry.adapters.pop(name, None)

    def new_entry(self, key: str, model: torch.nn.Module, base: Source, job: LoadJob) -> Entry:
        """A cache entry for a freshly loaded model, measured once."""
        measured = loader.measure(model)
        info = ModelInfo(
            model_key=key, model_class=type(model).__name__,
            base_model=BaseModelInfo(ref=base.ref, revision=base.revision, path=str(base.path),
                                     fingerprint=base.fingerprint),
            num_parameters=measured.parameters, footprint_bytes=measured.footprint,
            dtype=str(model.dtype).removeprefix("torch."),
            quantization=job.quantization.method.value,
            quantized_modules=measured.quantized_modules,
            device_map=loader.device_summary(model, self.identity.device))
        return Entry(key=key, model=model, info=info, base=base,
                     tenant=self.policy.owner(job, base), bytes=info.footprint_bytes,
                     placement=job.placement)

    def info(self, entry: Entry, cache_hit: bool, seconds: float, *, measure: bool = True) -> ModelInfo:
        """The entry's ModelInfo now; `measure` False reuses its bytes (nothing attached since)."""
        attached, active = adapters.names(entry.model)
        footprint = loader.footprint(entry.model) if measure else entry.bytes
        entry.bytes = footprint
        return entry.info.model_copy(update={
            "adapters": attached, "active_adapters": active, "footprint_bytes": footprint,
            "worker": self.identity.name, "device": self.identity.device, "cache_hit": cache_hit,
            "load_seconds": round(seconds, 4), "pinned": entry.pinned,
            "keep_alive_seconds": entry.keep_alive})


def check_base(base: Source, adapter: Source) -> None:
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
