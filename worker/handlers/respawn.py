"""A model key outlives its worker: a run job on a key this worker lacks loads it from its spec.

When a worker dies, run jobs naming a model key it held (queued on it, or submitted after)
reach another worker (the reaper moves its queues; routing sends new ones as a load would
go). That worker finds the key's load spec (tasks/state/model_specs.py) and loads the model as
that load job would, for the run job's tenant: a private model's spec is its owner's alone
(another tenant's key stays not found), a shared base's is anyone's. A key whose spec now
loads a different model (its files changed) fails with ModelNotFound naming the new key.

What is recovered: the model as its load made it, with the saved adapters attached to it since
(attach jobs, later loads: tasks/state/model_specs.py keeps them with the spec of a private model).
What is not: adapters added in memory by tasks and never saved, and anything a task changed
in place.
"""

from __future__ import annotations

import logging

from schemas import ModelNotFound
from schemas.tenants import SHARED_TENANT
from tasks.state.model_specs import ModelSpecs
from worker.handlers.load import LoadHandler
from worker.jobs.progress import Reporter

log = logging.getLogger(__name__)


class Respawn:
    """Loads lost model keys again from their specs, through the worker's load handler."""

    def __init__(self, specs: ModelSpecs, load: LoadHandler) -> None:
        self.specs = specs
        self.load = load

    def resident(self, key: str) -> None:
        """A run job uses resident model `key`: its spec lives on (a TTL renewal now and then)."""
        self.specs.touch(key)

    def reload(self, key: str, tenant: str, reporter: Reporter) -> bool:
        """Load `key` from its spec for a job of `tenant`; False when there is no spec the
        tenant may use (the caller then reports the key not found)."""
        found = self.specs.get(key)
        if found is None:
            return False
        owner, spec = found
        if owner not in (tenant, SHARED_TENANT):
            return False
        log.info("model %s is not resident here (its worker was lost or unloaded it): loading "
                 "it again from its spec (%s)", key, spec.model.display)
        info = self.load.run(spec.model_copy(update={"tenant": tenant}), reporter)
        if info.model_key != key:
            raise ModelNotFound(
                f"model {key} was lost with its worker, and its load spec ({spec.model.display}) "
                f"now loads another model, {info.model_key} (its files changed, or this worker "
                f"places it differently): run on {info.model_key}, or load it again",
                model_key=key, loaded=info.model_key)
        return True
