"""Reading the worker registry and choosing a queue for a job (no torch).

Workers write their entries (worker/heartbeat.py); producers read them here.
Routing: a job for a resident model goes to its holder's own queue; a new load
goes to the live worker with the most free bytes, and a claim on its request
key (`Keys.loading`) sends identical loads submitted meanwhile to the same worker,
whose solo pool then serves them from its cache: one load per key. A run job is
routed the same way among the workers that offer its task: to the holder of its
model, or (with a load spec) as its load would be.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import redis

from schemas import (
    AccessDenied,
    AttachAdapterJob,
    Job,
    LoadJob,
    ModelNotFound,
    RunJob,
    TaskNotFound,
    UnloadJob,
    WorkerInfo,
)
from schemas.tenants import SHARED_TENANT
from tasks.connection import text
from tasks.keys import SHARED_QUEUE, Keys
from tasks.scripts import script


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
        self.read_script = script(client, "registry_read")  # public: the client pipelines it
        self._parsed: dict[bytes, WorkerInfo] = {}  # frozen entries by their JSON

    def workers(self) -> list[WorkerInfo]:
        """The live workers by name (one round trip); names whose entry expired are dropped."""
        return self.read()[0]

    def read(self, also: Sequence[str] = ()) -> tuple[list[WorkerInfo], list[bytes | None]]:
        """The live workers, and the values of the keys `also`, read in one round trip."""
        keys, args = self.read_call(also)
        return self.parse(self.read_script(keys=keys, args=args), also)

    def read_call(self, also: Sequence[str] = ()) -> tuple[list[str], list[Any]]:
        """`read`'s script arguments (keys, args), for a caller that pipelines it (see `parse`)."""
        return [self.keys.workers(), *also], [self.keys.worker("")]

    def parse(self, reply: list[Any], also: Sequence[str] = ()) -> tuple[list[WorkerInfo],
                                                                         list[bytes | None]]:
        """`read`'s result from its script's reply (names whose entry expired are dropped)."""
        values, reply = [value or None for value in reply[:len(also)]], reply[len(also):]
        entries = sorted((text(name), raw) for name, raw in zip(reply[::2], reply[1::2], strict=True))
        live = [self._info(raw) for _, raw in entries if raw]
        gone = [name for name, raw in entries if not raw]
        if gone:
            self.redis.srem(self.keys.workers(), *gone)
        return live, values

    def _info(self, raw: bytes) -> WorkerInfo:
        """An entry parsed; the same bytes (an entry unchanged since the last read) parse once."""
        info = self._parsed.get(raw)
        if info is None:
            if len(self._parsed) >= 64:
                self._parsed.clear()
            info = self._parsed[raw] = WorkerInfo.model_validate_json(raw)
        return info

    def holder(self, model_key: str) -> WorkerInfo | None:
        """The worker where `model_key` is resident, if any."""
        for worker in self.workers():
            if worker.holds(model_key):
                return worker
        return None

    def route(self, job: Job, workers: list[WorkerInfo] | None = None) -> str:
        """The queue for `job`; a load sent to a worker claims its request key there.

        `workers` is the registry as the caller just read it (else it is read here).
        ModelNotFound for a job on a model no live worker holds; TaskNotFound for a run
        job whose task no live worker offers (with none registered, it waits in the queue).
        """
        workers = self.workers() if workers is None else workers
        if isinstance(job, RunJob):
            workers = offering(job.task, workers)
            if job.model.load is not None:
                return self._route_load(job.model.load, workers)
        if not isinstance(job, LoadJob):
            queue = choose_queue(job, workers, shared=self.keys.queue())
            if queue == self.keys.queue():
                raise not_resident(target_key(job) or "")
            return queue
        return self._route_load(job, workers)

    def _route_load(self, job: LoadJob, workers: list[WorkerInfo]) -> str:
        wanted = request_key(job)
        holder = _serving(wanted, workers)
        if holder is not None:
            return holder.queue  # resident there already: a cache hit needs no claim
        queue = choose_queue(job, workers, wanted, shared=self.keys.queue())
        if queue == self.keys.queue():
            return queue
        key = self.keys.loading(wanted)
        live = {w.queue for w in workers}
        for _ in range(3):
            if self.redis.set(key, queue, nx=True, px=self.claim_ms):
                return queue
            claimed = self.redis.get(key)
            if claimed is not None and text(claimed) in live:
                return text(claimed)  # an identical load is in flight there
            self.redis.delete(key)  # its worker is gone
        return queue


def choose_queue(job: Job, workers: list[WorkerInfo], wanted: str | None = None, *,
                 shared: str = SHARED_QUEUE) -> str:
    """The holder's queue for jobs on a resident model and resident loads; a new load to the
    most free bytes; the shared queue (`shared`, the prefix's) when no worker fits.

    `wanted` is the load's request key, when the caller has it already.
    """
    if isinstance(job, RunJob) and job.model.load is not None:
        job = job.model.load
    if not isinstance(job, LoadJob):
        for worker in workers:
            if worker.holds(target_key(job) or ""):
                return worker.queue
        return shared
    holder = _serving(wanted or request_key(job), workers)
    if holder is not None:
        return holder.queue
    roomy = [w for w in workers if w.free_bytes > 0]
    if not roomy:
        return shared
    return max(roomy, key=lambda w: (w.free_bytes, w.name)).queue


def _serving(wanted: str, workers: list[WorkerInfo]) -> WorkerInfo | None:
    """The worker whose resident model serves loads with request key `wanted`."""
    for worker in workers:
        if any(wanted in m.request_keys for m in worker.models):
            return worker
    return None


def target_key(job: Job) -> str | None:
    """The resident model a job is about (attach, unload, a run on a model key); None for loads."""
    if isinstance(job, RunJob):
        return job.model.model_key
    return job.model_key if isinstance(job, (AttachAdapterJob, UnloadJob)) else None


def offering(task: str, workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """The workers that offer `task`; TaskNotFound when workers are registered and none does."""
    capable = [w for w in workers if w.offers(task)]
    if workers and not capable:
        offered = sorted({t for w in workers for t in w.tasks})
        raise TaskNotFound(f"no live worker offers task {task!r} (they offer "
                           f"{', '.join(offered[:20]) or 'none'}): start a worker with --tasks "
                           "MODULE for the module that registers it", task=task)
    return capable


def not_resident(model_key: str) -> ModelNotFound:
    """The error for a job on a model no live worker holds."""
    return ModelNotFound(f"model {model_key} is not resident on any live worker; load it first "
                         "(`modelq ls` lists resident models)", model_key=model_key)


def check_model_owner(job: Job, workers: list[WorkerInfo]) -> None:
    """AccessDenied before sending a job on another tenant's resident model (workers check too)."""
    key = target_key(job)
    if key is None:
        return
    for worker in workers:
        for model in worker.models:
            if model.model_key == key and model.tenant not in (job.tenant, SHARED_TENANT):
                raise AccessDenied(f"model {key} belongs to another tenant: load your own copy",
                                   model_key=key)


def claim(keys: Keys, job: LoadJob, worker: str) -> tuple[str, str]:
    """(key, value) of the routing claim that sends `job`'s identical loads to `worker`.

    The worker drops it, only while it still names its queue, with the job's final record.
    """
    return keys.loading(request_key(job)), keys.worker_queue(worker)
