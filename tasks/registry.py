"""Reading the worker registry and choosing a queue for a job (no torch).

Workers write their entries (worker/heartbeat.py); producers read them here.
Routing: a job for a resident model goes to its holder's own queue; a new load
goes to the live worker with the most free bytes, and a claim on its request
key (`Keys.loading`) sends identical loads submitted meanwhile to the same worker,
whose solo pool then serves them from its cache: one load per key.
"""

from __future__ import annotations

import hashlib
import json

import redis

from schemas import AttachAdapterJob, LoadJob, UnloadJob, WorkerInfo
from tasks.keys import SHARED_QUEUE, Keys, worker_queue

AnyJob = LoadJob | AttachAdapterJob | UnloadJob


def request_key(job: LoadJob) -> str:
    """What makes two load jobs the same load, as a producer can tell without resolving them."""
    spec = job.model_dump(mode="json", include={"model", "dtype", "quantization", "placement",
                                                "trust_remote_code", "tenant"})
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


class Registry:
    """The live workers, as their heartbeats last described them."""

    def __init__(self, client: redis.Redis, keys: Keys, claim_seconds: int = 3600) -> None:
        self.redis = client
        self.keys = keys
        self.claim_ms = claim_seconds * 1000

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

    def route(self, job: AnyJob) -> str:
        """The queue for `job`; a load sent to a worker claims its request key there."""
        workers = self.workers()
        queue = route(job, workers)
        if not isinstance(job, LoadJob) or queue == SHARED_QUEUE:
            return queue
        wanted = request_key(job)
        if any(wanted in m.request_keys for w in workers for m in w.models):
            return queue  # resident there already: a cache hit needs no claim
        key = self.keys.loading(wanted)
        live = {w.queue for w in workers}
        for _ in range(3):
            if self.redis.set(key, queue, nx=True, px=self.claim_ms):
                return queue
            claimed = self.redis.get(key)
            if claimed is not None and _text(claimed) in live:
                return _text(claimed)  # an identical load is in flight there
            self.redis.delete(key)  # its worker is gone
        return queue


def route(job: AnyJob, workers: list[WorkerInfo]) -> str:
    """The holder's queue for attach/unload and resident loads; a new load to the most free bytes."""
    if isinstance(job, (AttachAdapterJob, UnloadJob)):
        for worker in workers:
            if worker.holds(job.model_key):
                return worker.queue
        return SHARED_QUEUE
    wanted = request_key(job)
    for worker in workers:
        if any(wanted in m.request_keys for m in worker.models):
            return worker.queue
    roomy = [w for w in workers if w.free_bytes > 0]
    if not roomy:
        return SHARED_QUEUE
    return max(roomy, key=lambda w: (w.free_bytes, w.name)).queue


def release_claim(client: redis.Redis, keys: Keys, job: LoadJob, worker: str) -> None:
    """Drop this worker's claim on the job's request key (after its load ended, either way)."""
    client.eval(_RELEASE_CLAIM, 1, keys.loading(request_key(job)), worker_queue(worker))


# Delete the claim only if this worker holds it (one round trip, no race with a new claim).
_RELEASE_CLAIM = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
