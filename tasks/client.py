"""The producer's API: `Client.submit(job) -> JobHandle` (no torch).

A job is validated before anything is written; the record is written before the
task is sent (with its route read from the registry's indexes, in one round trip), and
removed again if routing refuses the job or the send fails, so nothing is half-enqueued.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import NoScriptError

from schemas import (
    AccessDenied,
    BrokerUnavailable,
    Envelope,
    Event,
    Job,
    JobRecord,
    JobStatus,
    LoadJob,
    RunJob,
    TimedOut,
    WorkerInfo,
    parse_job,
)
from tasks.auth import sign
from tasks.settings import Settings
from tasks.state.connection import connect
from tasks.state.events import follow
from tasks.state.keys import Keys
from tasks.state.registry import Registry, Route, check_model_owner
from tasks.state.store import Store, now, submitted
from tasks.state.turns import announce
from tasks.tenants import DEFAULT_TENANT, check_submit_quota, parse_limits, pick_queue, visible_workers

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


class Client:
    """Submits jobs and reads their records, events and the worker pool."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.redis = connect(self.settings)
        self.keys = Keys(self.settings.key_prefix)
        self.store = Store(self.redis, self.keys, self.settings.record_ttl_seconds,
                           blocking=connect(self.settings, blocking=True))
        self.registry = Registry(self.redis, self.keys, self.settings.max_load_seconds)
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:  # celery is slow to import; `modelq status` never needs it
            from tasks.app import create_app

            self._app = create_app(self.settings)
        return self._app

    def submit(self, job: Job | dict[str, Any], *, worker: str | None = None) -> JobHandle:
        """Record and enqueue `job`; InvalidJob if it does not validate, nothing written.

        `worker`: send it to that live worker's own queue instead of where routing would
        (for a caller that spreads jobs over the pool itself, e.g. tasks/harness.py); a run
        job on a model key must name a worker that holds the model.
        """
        job = self._as_tenant(parse_job(job) if isinstance(job, dict) else job)
        job_id = uuid.uuid4().hex
        record = submitted(job_id, job, now())
        try:
            route = self._route_and_create(record)
        except redis.RedisError as exc:
            raise BrokerUnavailable(self._unreachable(exc)) from exc
        limits = parse_limits(route.limits)
        try:  # anything refused from here on takes the record back: nothing half-enqueued
            if limits is not None:  # workers run with a tenants file
                check_submit_quota(self.redis, self.keys, job.tenant, limits)
                check_model_owner(job, route.tenants)
            queue = base = self.registry.queue_for(job, route)  # ModelNotFound, TaskNotFound: refused
            if worker is not None:
                queue = base = self._chosen(worker, route)
            if limits is not None:  # the tenant's share of that queue: fair turns between tenants
                queue = pick_queue(job.tenant, limits, job_id, base=base)
                self.redis.zadd(self.keys.open_jobs(job.tenant), {job_id: record.created_at.timestamp()})
        except redis.RedisError as exc:
            self._forget(job_id, job.tenant, route)
            raise BrokerUnavailable(self._unreachable(exc)) from exc
        except BaseException:
            self._forget(job_id, job.tenant, route)
            raise
        envelope = Envelope(job_id=job_id, submitted_at=record.created_at, job=job)
        try:
            self.app.send_task(
                "modelq.run", args=[self._signed(envelope)], task_id=job_id,
                queue=queue, retry=True, argsrepr=f"<{job.kind} job {job_id}>", kwargsrepr="{}",
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:
            self._forget(job_id, job.tenant, route)
            raise BrokerUnavailable(self._unreachable(exc)) from exc
        if limits is not None:  # its share takes its turns (tasks/state/turns.py)
            announce(self.redis, self.keys, base, queue, worker_ttl=self.settings.worker_ttl_seconds)
        log.debug("submitted job %s (%s) to %s", job_id, job.kind, queue)
        return JobHandle(self, job_id, submitted=True)

    def _chosen(self, worker: str, route: Route) -> str:
        """The queue of the worker a caller chose; the load claim routing took is given back
        (the job goes elsewhere)."""
        if route.claim is not None:
            self.store.release([route.claim])
        return self.keys.worker_queue(worker)

    def _route_and_create(self, record: JobRecord) -> Route:
        """The job's route (with the tenant's limits) and its record written, in one round
        trip: both scripts pipelined by digest (a script Redis forgot, after a restart, runs
        alone). The route's cost does not grow with the pool (tasks/state/lua/route.lua)."""
        calls = [(self.registry.route_script, self.registry.route_call(record.job)),
                 (self.store.create_script, self.store.create_call(record))]
        with self.redis.pipeline(transaction=False) as pipe:
            for script, (keys, args) in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = pipe.execute(raise_on_error=False)
        for i, (script, (keys, args)) in enumerate(calls):
            if isinstance(replies[i], NoScriptError):
                replies[i] = script(keys=keys, args=args)
            elif isinstance(replies[i], Exception):
                raise replies[i]
        self.store.created(record, replies[1])
        return self.registry.parse_route(calls[0][1][0], replies[0])

    def run(self, task: str, *, model: str | LoadJob | dict[str, Any],
            adapters: str | list[str] | tuple[str, ...] | None = None, args: Sequence[Any] = (),
            kwargs: dict[str, Any] | None = None, timeout_seconds: float | None = None) -> JobHandle:
        """Run the model task `task` on `model`: a resident model's key, or a load job (or its
        dict) to load first. `adapters`: the adapters active for the call (None: as the model
        stands; []: the base alone). The record's result is a RunResult."""
        target: dict[str, Any] = ({"model_key": model} if isinstance(model, str)
                                  else {"load": model})
        return self.submit(RunJob.model_validate({
            "task": task, "model": target, "adapters": adapters, "args": list(args),
            "kwargs": kwargs or {}, "timeout_seconds": timeout_seconds,
            "tenant": self.settings.tenant or DEFAULT_TENANT}))

    def tasks(self) -> dict[str, list[str]]:
        """The model tasks the live pool offers, each with the workers that offer it."""
        offered: dict[str, list[str]] = {}
        for worker in self.registry.workers():
            for task in worker.tasks:
                offered.setdefault(task, []).append(worker.name)
        return dict(sorted(offered.items()))

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    def status(self, job_id: str) -> JobRecord:
        """The job's record; AccessDenied when it belongs to another tenant than this client's."""
        record = self.store.get(job_id)
        if self.settings.tenant is not None and record.tenant != self.settings.tenant:
            raise AccessDenied(f"job {job_id} belongs to another tenant: tenant "
                               f"{self.settings.tenant!r} reads only its own jobs", job_id=job_id)
        return record

    def workers(self) -> list[WorkerInfo]:
        """The pool; with a tenant set, only its own models, shared bases and its own adapters."""
        workers = self.registry.workers()
        return workers if self.settings.tenant is None else visible_workers(workers, self.settings.tenant)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job at once; a running one stops at its next stage boundary."""
        self.status(job_id)  # another tenant's job: AccessDenied
        record = self.store.transition(job_id, JobStatus.cancelled, message="cancelled before start",
                                       only_from=frozenset({JobStatus.queued, JobStatus.retrying}))
        if record is None:
            current = self.store.get(job_id)
            if not current.terminal:
                self.store.request_cancel(job_id)
            return current
        return record

    def _as_tenant(self, job: Job) -> Job:
        """The job for this client's tenant; AccessDenied if it names another tenant."""
        tenant = self.settings.tenant
        if tenant is None or job.tenant == tenant:
            return job
        if job.tenant != DEFAULT_TENANT:
            raise AccessDenied(f"this client acts for tenant {tenant!r} and cannot submit jobs for "
                               f"{job.tenant!r}: set MODELQ_TENANT", tenant=job.tenant)
        if isinstance(job, RunJob) and job.model.load is not None:  # its load is the tenant's too
            load = job.model.load.model_copy(update={"tenant": tenant})
            return job.model_copy(update={"tenant": tenant,
                                          "model": job.model.model_copy(update={"load": load})})
        return job.model_copy(update={"tenant": tenant})

    def _signed(self, envelope: Envelope) -> dict[str, Any]:
        """The envelope as sent: signed with the tenant key when this client has one."""
        payload = envelope.model_dump(mode="json")
        key = self.settings.tenant_key
        if key is None:
            return payload
        return sign(payload, key.get_secret_value(), tenant=envelope.job.tenant,
                    ttl_seconds=self.settings.signature_ttl_seconds)

    def _forget(self, job_id: str, tenant: str, route: Route) -> None:
        """Take back an unsent job: its record, and the load claim its route took."""
        try:
            self.store.delete(job_id, tenant)
            self.store.release([route.claim] if route.claim else [])
        except redis.RedisError:
            log.warning("could not remove the record of unsent job %s", job_id)

    def _unreachable(self, exc: Exception) -> str:
        where = self.settings.redis_url.rsplit("@", 1)[-1]  # never print a password
        if isinstance(exc, redis.TimeoutError) and "reading" in str(exc):
            return (f"Redis at {where} did not answer within "
                    f"{self.settings.command_timeout_seconds:g}s (connected, no reply); nothing "
                    "was enqueued. Check that it is a working Redis, not busy or paused")
        return (f"Redis at {where} is unreachable ({type(exc).__name__}); nothing was enqueued. "
                "Start Redis (or `modelq up`) or set MODELQ_REDIS_URL")


class JobHandle:
    """A submitted job: read its record, follow its events, wait for it, cancel it."""

    def __init__(self, client: Client, job_id: str, *, submitted: bool = False) -> None:
        self.client = client
        self.job_id = job_id
        self._mine = submitted  # submitted by this client: its tenant's own job

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"

    def status(self) -> JobRecord:
        return self.client.status(self.job_id)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events from the first until the terminal one (or until `timeout`)."""
        self.client.status(self.job_id)  # another tenant's job: AccessDenied
        return follow(self.client.store, self.job_id, timeout=timeout)

    def wait(self, timeout: float | None = None) -> JobRecord:
        """The terminal record; TimedOut (the job goes on) if it takes longer than `timeout`.

        Blocks on the job's one-entry 'done' stream: one wake when it ends, checking the
        record itself every second (a record older than that stream, or one deleted).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._mine:  # just submitted: block for its end at once (no read, no tenant check)
            block = 1.0 if timeout is None else min(1.0, timeout)
            record = self.client.store.ended(self.job_id, block_ms=max(1, int(block * 1000))) \
                or self.status()
        else:
            record = self.status()  # another tenant's job: AccessDenied
        while not record.terminal:
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                raise TimedOut(f"job {self.job_id} is still {record.status.value} after {timeout}s; "
                               "it goes on: wait again or cancel it", job_id=self.job_id)
            record = self.client.store.ended(self.job_id, block_ms=max(1, int(left * 1000))) \
                or self.client.store.get(self.job_id)
        return record

    def cancel(self) -> JobRecord:
        return self.client.cancel(self.job_id)
