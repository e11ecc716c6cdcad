"""Reading the worker registry and choosing a queue for a job (no torch).

Workers write their entries and the routing indexes those imply (worker/recovery/heartbeat.py,
tasks/state/index.py); producers read them here. Routing is one script over the indexes
(tasks/state/lua/route.lua), one round trip whatever the pool's size: a job for a resident
model goes to its holder's own queue; a new load goes to the live worker with the most
free bytes, and a claim on its request key (`Keys.loading`) sends identical loads
submitted meanwhile to the same worker, whose solo pool then serves them from its cache:
one load per key. A run job is routed the same way among the workers that offer its
task: to the holder of its model, or (with a load spec) as its load would be; a run job on
a model key no live worker holds goes as a load would when the key's load spec is kept
(tasks/state/model_specs.py), and the worker that takes it loads the model again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

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
from tasks.state.connection import text
from tasks.state.keys import Keys
from tasks.state.registry_entries import beat_at, live_entries
from tasks.state.scripts import script

CANDIDATES = 32
"""The most entries of one routing index a route looks at (holders of a model, servers of a
request key, the roomiest workers): a dead worker's entries linger there until it is reaped."""


def request_key(job: LoadJob) -> str:
    """What makes two load jobs the same load, as a producer can tell without resolving them."""
    spec = job.model_dump(mode="json", include={"model", "dtype", "quantization", "placement",
                                                "trust_remote_code", "tenant"})
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Route:
    """The route script's answer for one job (`Registry.route_call`, `Registry.parse_route`)."""

    outcome: str  # 'queue', 'model' (ModelNotFound) or 'task' (TaskNotFound)
    detail: str  # the queue; for 'task', the tasks the live pool offers, comma-separated
    tenants: tuple[str, ...] = ()  # tenants of the job's model where live workers hold it
    claim: tuple[str, str] | None = None  # (key, value) of the load claim this route took
    limits: bytes | None = None  # the tenant's limits key, read in the same script


class Registry:
    """The live workers, as their heartbeats last described them, and routing over them."""

    def __init__(self, client: redis.Redis, keys: Keys, claim_seconds: int = 3600) -> None:
        self.redis = client
        self.keys = keys
        self.claim_ms = claim_seconds * 1000
        self.route_script = script(client, "route")  # public: the client pipelines it
        self._parsed: dict[bytes, WorkerInfo] = {}  # frozen entries by their JSON

    def workers(self) -> list[WorkerInfo]:
        """The live workers by name (one round trip, O(workers): a listing, not routing)."""
        entries = live_entries(self.redis, self.keys)
        if len(self._parsed) > 2 * len(entries) + 64:
            self._parsed.clear()
        return [self._info(raw, deadline) for deadline, raw in entries]

    def _info(self, raw: bytes, deadline_ms: float) -> WorkerInfo:
        """An entry parsed (the same bytes parse once), its beat time from its deadline."""
        info = self._parsed.get(raw)
        if info is None:
            info = self._parsed[raw] = WorkerInfo.model_validate_json(raw)
        if info.ttl_seconds is None:
            return info
        return info.model_copy(update={"heartbeat_at": beat_at(deadline_ms, info.ttl_seconds)})

    def holder(self, model_key: str) -> WorkerInfo | None:
        """The live worker where `model_key` is resident, if any (from the model's index)."""
        names = sorted(text(n) for n in cast(list[bytes], self.redis.hkeys(self.keys.holders(model_key))))
        entries = [self.keys.worker(name) for name in names]
        raws = cast(list[bytes | None], self.redis.mget(entries)) if entries else []
        found = next((raw for raw in raws if raw), None)
        return WorkerInfo.model_validate_json(found) if found else None

    def route_call(self, job: Job) -> tuple[list[str], list[Any]]:
        """The route script's arguments (keys, args) for `job`, for a caller that pipelines it
        (see `parse_route`); it reads the tenant's limits key too."""
        task = job.task if isinstance(job, RunJob) else ""
        load = job.model.load if isinstance(job, RunJob) else job if isinstance(job, LoadJob) else None
        keys = [self.keys.deadlines(), self.keys.tenant_limits(job.tenant),
                self.keys.free(task or None), self.keys.tasks_offered()]
        if load is not None:
            wanted = request_key(load)
            keys += [self.keys.serving(wanted), self.keys.loading(wanted)]
        else:
            key = target_key(job) or ""
            keys.append(self.keys.holders(key))
            if task:  # a run job on a model key: loaded again from its spec if its holders died
                keys += [self.keys.model_spec(key), self.keys.respawning(key)]
        return keys, ["load" if load is not None else "model", task, self.claim_ms,
                      self.keys.worker_queue(""), self.keys.queue(), CANDIDATES, job.tenant]

    @staticmethod
    def parse_route(keys: list[str], reply: list[Any]) -> Route:
        """The route script's reply as a Route; `keys`: the ones `route_call` gave it."""
        outcome, limits, tenants, detail, claimed = reply
        return Route(outcome=text(outcome), detail=text(detail),
                     tenants=tuple(text(t) for t in tenants),
                     claim=(keys[-1], text(detail)) if claimed else None,
                     limits=cast(bytes, limits) or None)

    def route(self, job: Job) -> str:
        """The queue for `job` (its own round trip; `Client.submit` pipelines `route_call`)."""
        keys, args = self.route_call(job)
        return self.queue_for(job, self.parse_route(keys, self.route_script(keys=keys, args=args)))

    def queue_for(self, job: Job, route: Route) -> str:
        """The queue `route` chose for `job`. ModelNotFound for a job on a model no live worker
        (offering its task) holds, and for a run job also no spec of its tenant (or a shared
        one) can load again; TaskNotFound for a run job whose task no live worker offers
        while some are live (with none live, it waits in the shared queue)."""
        if route.outcome == "model":
            raise not_resident(target_key(job) or "")
        if route.outcome == "task":
            task = job.task if isinstance(job, RunJob) else ""
            raise TaskNotFound(f"no live worker offers task {task!r} (they offer "
                               f"{', '.join(route.detail.split(',')) if route.detail else 'none'}): "
                               "start a worker with --tasks MODULE for the module that registers it",
                               task=task)
        return route.detail


def target_key(job: Job) -> str | None:
    """The resident model a job is about (attach, unload, a run on a model key); None for loads."""
    if isinstance(job, RunJob):
        return job.model.model_key
    return job.model_key if isinstance(job, (AttachAdapterJob, UnloadJob)) else None


def not_resident(model_key: str) -> ModelNotFound:
    """The error for a job on a model no live worker holds."""
    return ModelNotFound(f"model {model_key} is not resident on any live worker; load it first "
                         "(`modelq ls` lists resident models)", model_key=model_key)


def check_model_owner(job: Job, tenants: Iterable[str]) -> None:
    """AccessDenied before sending a job on another tenant's resident model (workers check too);
    `tenants`: the model's tenants where live workers hold it (`Route.tenants`)."""
    key = target_key(job)
    if key is not None and any(t not in (job.tenant, SHARED_TENANT) for t in tenants):
        raise AccessDenied(f"model {key} belongs to another tenant: load your own copy",
                           model_key=key)


def claim(keys: Keys, job: LoadJob, worker: str) -> tuple[str, str]:
    """(key, value) of the routing claim that sends `job`'s identical loads to `worker`.

    The worker drops it, only while it still names its queue, with the job's final record.
    """
    return keys.loading(request_key(job)), keys.worker_queue(worker)
