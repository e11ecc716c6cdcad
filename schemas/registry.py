"""What a worker publishes about itself in the registry (no torch)."""

from __future__ import annotations

from datetime import datetime

from schemas.base import Contract, Versioned


class ResidentModel(Contract):
    """One model in a worker's cache."""

    model_key: str
    base: str
    tenant: str
    bytes: int
    adapters: tuple[str, ...] = ()
    active_adapters: tuple[str, ...] = ()
    quantization: str = "none"
    pinned: bool = False
    keep_alive_seconds: float | None = None
    shared_by: tuple[str, ...] = ()  # tenants using this shared base (its tenant is '*')
    last_used: datetime
    request_keys: tuple[str, ...] = ()  # tasks.state.registry.request_key of the loads it serves


class WorkerInfo(Versioned):
    """A live worker: where it runs, what it can hold and what it holds."""

    name: str
    host: str
    pid: int
    device: str
    queue: str
    capacity_bytes: int
    free_bytes: int
    models: tuple[ResidentModel, ...] = ()
    tasks: tuple[str, ...] = ()  # the model tasks it offers (run jobs), built-in and imported
    started_at: datetime
    heartbeat_at: datetime  # as read: its deadline less `ttl_seconds` (the entry is written
    # only when what it says changes; each beat only renews it)
    ttl_seconds: float | None = None  # how long it lives after a beat

    def holds(self, model_key: str) -> bool:
        return any(m.model_key == model_key for m in self.models)

    def offers(self, task: str) -> bool:
        return task in self.tasks
