"""Admitting a new model into the cache: estimate, make room, load (from an artifact if any), retry OOM once.

The steps around one cache-miss load: predict its bytes (worker/models/estimate.py),
evict idle models if that makes room or fail with InsufficientMemory, load the
quantized artifact when this host has one (worker/models/artifacts.py) or quantize on
load and save one, and on an out-of-memory error free what the load took, evict
every idle model and try once more before failing cleanly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from schemas import InsufficientMemory, LoadJob
from schemas.errors import ModelqError
from worker.access import OPEN, Access
from worker.errors import translate
from worker.fault_hooks import AllocationFaults
from worker.jobs.progress import Reporter
from worker.models import estimate, loader
from worker.models.artifacts import Artifacts
from worker.models.cache import ModelCache, release_memory
from worker.models.resolve import Resolved, fetch

log = logging.getLogger(__name__)

@dataclass
class Admitted:
    """A freshly loaded model and what was predicted and reused for it."""

    model: PreTrainedModel
    estimated_bytes: int
    from_artifact: bool


class Admission:
    """Loads cache misses into `cache`, within its capacity."""

    def __init__(self, cache: ModelCache, device: str, artifacts: Artifacts | None = None,
                 faults: AllocationFaults | None = None) -> None:
        self.cache = cache
        self.device = device
        self.artifacts = artifacts
        self.faults = faults or AllocationFaults()

    def load(self, resolved: Resolved, job: LoadJob, reporter: Reporter,
             access: Access = OPEN) -> Admitted:
        """Load `job`'s base (no adapters) once there is room for it and its adapters.

        `access`: the job's tenant's roots and hub token, for the adapters and the load.
        """
        ref = resolved.base.ref
        adapter_folders = [fetch(a.ref, access=access).path for a in job.adapters if a.ref.path is not None]
        if resolved.adapter is not None:
            adapter_folders.append(resolved.adapter.path)
        needed = self._estimate(resolved, job, adapter_folders)
        self.cache.make_room(needed, what=ref)
        artifact = self._artifact(resolved, job)
        if artifact is not None:
            log.info("loading %s from its quantized artifact %s", ref, artifact)
        for attempt in (1, 2):
            try:
                self.faults.check()
                model = loader.load(resolved, job, self.device, reporter, access=access,
                                    artifact=artifact)
                break
            except ModelqError:
                raise
            except Exception as exc:
                release_memory()
                error = translate(exc, ref=ref)
                if not isinstance(error, InsufficientMemory) or attempt == 2:
                    raise error from exc
                evicted = self.cache.evict_idle()
                log.warning("out of memory loading %s; evicted %d idle models, retrying once",
                            ref, len(evicted))
        if artifact is None and self.artifacts is not None and self.artifacts.eligible(job):
            self.artifacts.save(model, resolved.base.identity, job)
        return Admitted(model, needed, artifact is not None)

    def _estimate(self, resolved: Resolved, job: LoadJob, adapters: list[Path]) -> int:
        try:
            return estimate.estimate(resolved.base.path, resolved.config, job, adapters)
        except Exception:  # an odd header or config: admit on the bytes we can see
            log.exception("could not estimate %s; counting its safetensors bytes", resolved.base.ref)
            return estimate.weights_bytes(resolved.base.path)

    def _artifact(self, resolved: Resolved, job: LoadJob) -> Path | None:
        if self.artifacts is None or not self.artifacts.eligible(job):
            return None
        return self.artifacts.find(resolved.base.identity, job)
