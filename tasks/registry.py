"""Reading the worker registry and choosing a queue for a job (no torch).

Workers write their entries (worker/heartbeat.py); producers read them here.
"""

from __future__ import annotations

import redis

from schemas import AttachAdapterJob, LoadJob, UnloadJob, WorkerInfo
from tasks.keys import SHARED_QUEUE, Keys


class Registry:
    """The live workers, as their heartbeats last described them."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    def workers(self) -> list[WorkerInfo]:
        names = sorted(_text(n) for n in self.redis.smembers(self.keys.workers()))
        if not names:
            return []
        raws = self.redis.mget([self.keys.worker(n) for n in names])
        live = [WorkerInfo.model_validate_json(raw) for raw in raws if raw is not None]
        gone = [n for n, raw in zip(names, raws) if raw is None]
        if gone:
            self.redis.srem(self.keys.workers(), *gone)
        return live

    def holder(self, model_key: str) -> WorkerInfo | None:
        """The worker where `model_key` is resident, if any."""
        for worker in self.workers():
            if worker.holds(model_key):
                return worker
        return None


def route(job: LoadJob | AttachAdapterJob | UnloadJob, workers: list[WorkerInfo]) -> str:
    """The queue for `job`: the holder's own queue for attach/unload, else the shared one."""
    if isinstance(job, (AttachAdapterJob, UnloadJob)):
        for worker in workers:
            if worker.holds(job.model_key):
                return worker.queue
    return SHARED_QUEUE


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
