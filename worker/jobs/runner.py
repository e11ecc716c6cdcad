"""One delivery of a job: decode it, move its record through its states, run its handler.

The Celery task body (worker/celery_worker.py) calls `Runner.run` and acts on its Outcome.
Every attempt ends in a terminal record: succeeded, failed with an ErrorInfo, or
cancelled. Deliveries are at least once, so each one is checked before it starts anything:

- a job that already ended: nothing to do (no second effect);
- a job whose lease (worker/jobs/lease.py) a live worker holds: `Outcome.busy`, the
  task body hands the message back with a countdown (the first delivery is still
  running: a load that outlived the broker's visibility timeout);
- a job left `running` with no live lease: its worker died; this is attempt N+1,
  and after `max_attempts` it fails as WorkerLost instead (a job that keeps
  killing workers stops).

A first attempt takes its lease and is marked running in one script (tasks/state/store.py
Store.start). A job its handler's `cached` answers (a load the cache already serves as
asked) is written from queued to succeeded at once (Store.run_through).

A CUDA error that poisons the context fails the job and returns `Outcome.poisoned`:
the process must exit so its supervisor starts a clean one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from schemas import Envelope, JobRecord, JobStatus, Progress, WorkerLost, decode_envelope
from schemas.errors import InvalidJob, ModelqError
from tasks.state.store import Store, submitted
from worker.fault_hooks import Faults
from worker.handlers import Handler
from worker.jobs.attempt import Attempt, Outcome, Recorder, RunHooks, RunObserver
from worker.jobs.gate import Gate, OpenGate
from worker.jobs.lease import Leases

log = logging.getLogger(__name__)

__all__ = ["Begun", "Outcome", "RunHooks", "RunObserver", "RunOptions", "Runner"]


@dataclass(frozen=True)
class Begun:
    """An attempt started here: leased, its record running (as `record` says)."""

    attempt: Attempt
    record: JobRecord
    cancel: bool  # the cancel flag as read with the lease


class Batches(Protocol):
    """Runs a started job together with queued ones that may share its call (batching.py)."""

    def takes(self, begun: Begun) -> bool: ...

    def run(self, first: Begun, runner: Runner) -> Outcome: ...


@dataclass(frozen=True)
class RunOptions:
    """How the runner treats every job: attempts, the default time limit, the test hooks."""

    max_attempts: int
    default_timeout: float
    faults: Faults = field(default_factory=Faults)


class Runner:
    """Runs job envelopes for one worker and writes their records."""

    def __init__(self, store: Store, handlers: Mapping[str, Handler], leases: Leases, *,
                 worker: tuple[str, str], options: RunOptions, hooks: RunHooks | None = None,
                 gate: Gate | None = None) -> None:
        self.store = store
        self.batcher: Batches | None = None  # cross-job batches (worker/app.py sets them)
        self.handlers = handlers
        self.leases = leases
        self.gate = gate or OpenGate()
        self.options = options
        self.hooks = hooks or RunHooks()
        self.recorder = Recorder(store, leases, worker=worker, hooks=self.hooks)

    def run(self, payload: Any) -> Outcome:
        """Run one delivery; Redis unreachable before the job started means `busy` (try later)."""
        try:
            return self._run(payload)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("Redis unreachable before the job could start (%s); handing it back", exc)
            return Outcome.busy

    def _run(self, payload: Any) -> Outcome:
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        try:
            envelope = decode_envelope(payload)
        except InvalidJob as exc:
            log.error("job %s: refused a malformed message: %s", job_id, exc)
            if isinstance(job_id, str) and self.gate.accepts(payload, None):  # signed by its tenant
                self.recorder.fail(job_id, exc, only_from=frozenset({JobStatus.queued,
                                                                     JobStatus.retrying}))
            return Outcome.done
        if not self.gate.accepts(payload, envelope):  # refused before anything is resolved
            return Outcome.done
        handler = self.handlers[envelope.job.kind]
        if self._served_from_cache(envelope, handler):
            return Outcome.done
        return self._start(envelope, handler)

    def _start(self, envelope: Envelope, handler: Handler) -> Outcome:
        begun = self.begin(envelope, handler)
        if not isinstance(begun, Begun):
            return begun
        try:
            if self.batcher is not None and self.batcher.takes(begun):
                return self.batcher.run(begun, self)
            return self.execute(begun)
        finally:
            self.finish(begun.attempt)

    def admit(self, payload: Any) -> Begun | Outcome:
        """A message taken for a batch (worker/jobs/batching.py), checked as `run` checks a
        delivery and started with its lease; or what to do with its message instead."""
        envelope = decode_envelope(payload)
        if not self.gate.accepts(payload, envelope):
            return Outcome.done
        return self.begin(envelope, self.handlers[envelope.job.kind])

    def begin(self, envelope: Envelope, handler: Handler) -> Begun | Outcome:
        """Take the job's lease and mark it running (attempt N+1 after a lost worker); the
        started attempt, or what to do with the message when there is nothing to run here."""
        job_id, job = envelope.job_id, envelope.job
        opening = handler.opening(job)
        message, changes = self.recorder.start_changes(None, opening)
        changes["time_limit_seconds"] = shown_limit(self.time_limit(handler, job))
        lease = self.leases.lease(job_id)
        started = self.store.start(submitted(job_id, job, envelope.submitted_at), lease,
                                   message=message, **changes)
        if started.holder != lease[1]:
            if self.recorder.ended_already(job_id, started.current):
                return Outcome.done
            log.warning("job %s: delivered again while %s holds its lease and runs it (a load "
                        "longer than the visibility timeout); handing this delivery back", job_id,
                        started.holder)
            return Outcome.busy
        self.leases.hold(job_id)
        attempt = Attempt(job_id, job, handler, opening,
                          release=(self.leases.pair(job_id), *handler.claims(job)))
        try:
            record = started.record  # a first attempt is started already, with its lease
            if record is None:
                record = self._restart(attempt, started.current)
        except BaseException:
            self.finish(attempt)
            raise
        if record is None:
            self.finish(attempt)
            return Outcome.done
        for observer in self.hooks.observers:
            observer.job_started(record)
        log.info("job %s: %s attempt %d on %s", job_id, job.kind, record.attempt, record.worker)
        return Begun(attempt, record, started.cancel)

    def execute(self, begun: Begun) -> Outcome:
        """Run a started attempt alone, under its guard, and write its final record."""
        attempt = begun.attempt
        return self.recorder.execute(attempt, self.time_limit(attempt.handler, attempt.job),
                                     self.options.faults,
                                     cancel_seen=begun.cancel)

    def finish(self, attempt: Attempt) -> None:
        """Stop renewing the attempt's lease; release it and its claims if no final record did."""
        self.leases.forget(attempt.job_id)
        if not attempt.released:  # no final record written by this attempt
            self.recorder.release(attempt)

    def _served_from_cache(self, envelope: Envelope, handler: Handler) -> bool:
        """A first attempt the handler's cache answers ends in one write, started and
        succeeded with both events; False: run it in full (so does anything odd, which the
        full run then reports)."""
        job_id, job = envelope.job_id, envelope.job
        try:
            result = handler.cached(job)
        except Exception:  # the full run fails it with a record that says why
            return False
        if result is None:
            return False
        started = self.recorder.start_changes(None, handler.opening(job))
        final = self.store.run_through(
            submitted(job_id, job, envelope.submitted_at), lease=self.leases.pair(job_id)[0],
            started=started, ended=("done", {"result": result, "progress": Progress(fraction=1.0)}),
            release=handler.claims(job))
        if final is None:  # not as submitted (cancelled, a retry) or leased: the full run decides
            return False
        handler.served(result)
        for observer in self.hooks.observers:
            observer.job_started(final)
        log.info("job %s: %s served from the cache on %s (%s)", job_id, job.kind, final.worker,
                 result.model_key)
        for observer in self.hooks.observers:
            observer.job_ended(final)
        return True

    def _restart(self, attempt: Attempt, raw: bytes | None) -> JobRecord | None:
        """A later delivery of a started job: attempt N+1 (its worker died), or nothing to do."""
        job_id = attempt.job_id
        if raw is None:
            log.error("job %s: no record; dropping the message", job_id)
            return None
        current = self.store.adopt(job_id, raw)
        if current.status not in (JobStatus.queued, JobStatus.retrying, JobStatus.running):
            log.info("job %s: already ended (%s); dropping this delivery", job_id,
                     current.status.value)
            return None
        if current.status is JobStatus.running and current.attempt >= self.options.max_attempts:
            self.recorder.fail(job_id, worker_lost(current.attempt), attempt=attempt)
            return None
        message, changes = self.recorder.start_changes(current, attempt.opening)
        changes["time_limit_seconds"] = shown_limit(self.time_limit(attempt.handler, attempt.job))
        return self.store.transition(job_id, JobStatus.running, message=message,
                                     only_from=frozenset({current.status}), **changes)

    def time_limit(self, handler: Handler, job: Any) -> float:
        """The limit the job runs under: its handler's (a run job's may be infinite: no
        limit), else the worker's default (MODELQ_MAX_LOAD_SECONDS)."""
        return handler.timeout(job) or self.options.default_timeout


def shown_limit(limit: float) -> float | None:
    """A time limit as the record shows it: None for no limit."""
    return limit if math.isfinite(limit) else None


def worker_lost(attempts: int) -> ModelqError:
    return WorkerLost(f"the job's worker died {attempts} times while running it; it was stopped "
                      "so that it can't take down more workers: check the model, or raise "
                      "MODELQ_MAX_ATTEMPTS", attempts=attempts)
