"""One delivery of a job: decode it, move its record through its states, run it.

The Celery task body calls `Runner.run` and acts on its Outcome. Every attempt ends
in a terminal record: succeeded, failed with an ErrorInfo, or cancelled. Deliveries
are at least once, so each one is checked before it starts anything:

- a job that already ended: nothing to do (no second effect);
- a job whose lease (worker/lease.py) a live worker holds: `Outcome.busy`, the
  task body hands the message back with a countdown (the first delivery is still
  running: a load that outlived the broker's visibility timeout);
- a job left `running` with no live lease: its worker died; this is attempt N+1,
  and after `max_attempts` it fails as WorkerLost instead (a job that keeps
  killing workers stops).

A first attempt takes its lease and is marked running in one script (tasks/store.py
Store.start). A load the worker's cache already serves as asked skips all of that:
it is written from queued to succeeded at once (Store.run_through), or run in full
when its record is no longer as submitted.

A CUDA error that poisons the context fails the job and returns `Outcome.poisoned`:
the process must exit so its supervisor starts a clean one.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from schemas import (
    AttachAdapterJob,
    Cancelled,
    Envelope,
    ErrorInfo,
    JobRecord,
    JobStatus,
    LoadJob,
    ModelInfo,
    Progress,
    Stage,
    TimedOut,
    UnloadJob,
    WorkerLost,
    decode_envelope,
)
from schemas.errors import InvalidJob, JobNotFound, ModelqError
from tasks.store import Started, Store, submitted
from worker.cache import release_memory
from worker.errors import poisons_process, scrub, translate
from worker.faults import Faults
from worker.guard import JobGuard
from worker.lease import Leases
from worker.progress import Reporter
from worker.service import ModelService

log = logging.getLogger(__name__)

STARTABLE = frozenset({JobStatus.queued, JobStatus.retrying, JobStatus.running})
STORE_RETRY_SECONDS = 120.0
"""How long a finished attempt keeps trying to write its terminal record while Redis is away."""


AnyJob = LoadJob | AttachAdapterJob | UnloadJob


class Outcome(enum.Enum):
    """What the task body does with the message after `Runner.run`."""

    done = "done"  # ack it: the job ended (or the message was refused or is stale)
    busy = "busy"  # another live worker runs this job: hand the message back for later
    poisoned = "poisoned"  # ack it, then exit the process (the CUDA context is unusable)


class RunObserver(Protocol):
    """Cross-cutting work around a job (metrics, log context): told when it starts and ends."""

    def job_started(self, record: JobRecord) -> None: ...

    def job_ended(self, record: JobRecord) -> None: ...


@dataclass
class Attempt:
    """One delivery being run here: what its final record releases, and that record."""

    job_id: str
    job: AnyJob
    release: tuple[tuple[str, str], ...]  # (key, value): this process's lease, the load's claims
    final: JobRecord | None = None
    released: bool = False


class Runner:
    """Runs job envelopes for one worker and writes their records."""

    def __init__(self, store: Store, service: ModelService, *, max_attempts: int, leases: Leases,
                 default_timeout: float, faults: Faults | None = None,
                 on_change: Callable[[], None] = lambda: None,
                 on_stuck: Callable[[], None] = lambda: None,
                 observers: Sequence[RunObserver] = (),
                 admit: Callable[[Any, Envelope | None], bool] = lambda payload, envelope: True,
                 claims: Callable[[AnyJob], list[tuple[str, str]]] = lambda job: [],
                 ) -> None:
        self.store = store
        self.admit = admit  # tenants: signature, expiry, replay (worker/policy.py Gate.admit)
        self.observers = tuple(observers)
        self.service = service
        self.max_attempts = max_attempts
        self.leases = leases
        self.default_timeout = default_timeout
        self.faults = faults or Faults()
        self.on_change = on_change  # called after the cache changed (registry refresh)
        self.on_stuck = on_stuck  # a job stuck past its deadline: exit the process
        self.claims = claims  # (key, value) routing claims a job that ran here drops

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
            if isinstance(job_id, str) and self.admit(payload, None):  # signed by its tenant
                self._fail(job_id, exc, only_from=frozenset({JobStatus.queued, JobStatus.retrying}))
            return Outcome.done
        job_id, job = envelope.job_id, envelope.job
        if not self.admit(payload, envelope):  # refused before anything is resolved
            return Outcome.done
        if self._served_from_cache(envelope):
            return Outcome.done
        opening = _opening(job)
        message, changes = self._start_changes(None, opening)
        lease = self.leases.lease(job_id)
        started = self.store.start(submitted(job_id, job, envelope.submitted_at), lease,
                                   message=message, **changes)
        if started.holder != lease[1]:
            if self._ended_already(job_id, started.current):
                return Outcome.done
            log.warning("job %s: delivered again while %s holds its lease and runs it (a load "
                        "longer than the visibility timeout); handing this delivery back", job_id,
                        started.holder)
            return Outcome.busy
        self.leases.hold(job_id)
        attempt = Attempt(job_id, job, release=(self.leases.pair(job_id), *self.claims(job)))
        try:
            return self._run_leased(attempt, started, opening)
        finally:
            self.leases.forget(job_id)
            if not attempt.released:  # no final record written by this attempt
                self._release(attempt)

    def _served_from_cache(self, envelope: Envelope) -> bool:
        """A first attempt at a load this cache already serves as asked ends in one write,
        started and succeeded with both events; False: run it in full (so does anything odd,
        which the full run then reports)."""
        job_id, job = envelope.job_id, envelope.job
        if not isinstance(job, LoadJob) or self.faults.active:  # test hooks act on stages
            return False
        try:
            info = self.service.cached(job)
        except Exception:  # the full run fails it with a record that says why
            return False
        if info is None:
            return False
        message, changes = self._start_changes(None, _opening(job))
        final = self.store.run_through(
            submitted(job_id, job, envelope.submitted_at), lease=self.leases.pair(job_id)[0],
            started=(message, changes),
            ended=("done", {"result": info, "progress": Progress(fraction=1.0)}),
            release=self.claims(job))
        if final is None:  # not as submitted (cancelled, a retry) or leased: the full run decides
            return False
        self.service.served(info)
        for observer in self.observers:
            observer.job_started(final)
        log.info("job %s: load served from the cache on %s (%s)", job_id, final.worker, info.model_key)
        for observer in self.observers:
            observer.job_ended(final)
        return True

    def _ended_already(self, job_id: str, raw: bytes | None) -> bool:
        """True (and logged) when the job's record is terminal or gone: drop the delivery."""
        if raw is None:
            log.error("job %s: no record; dropping the message", job_id)
            return True
        if JobRecord.model_validate_json(raw).terminal:
            log.info("job %s: already ended; dropping this delivery", job_id)
            return True
        return False

    def _run_leased(self, attempt: Attempt, started: Started,
                    opening: tuple[Stage, str] | None) -> Outcome:
        job_id, job = attempt.job_id, attempt.job
        record = started.record  # a first attempt is started already, with its lease
        if record is None:
            if started.current is None:
                log.error("job %s: no record; dropping the message", job_id)
                return Outcome.done
            current = self.store.adopt(job_id, started.current)
            if current.status not in STARTABLE:
                log.info("job %s: already ended (%s); dropping this delivery", job_id,
                         current.status.value)
                return Outcome.done
            if current.status is JobStatus.running and current.attempt >= self.max_attempts:
                self._fail(job_id, WorkerLost(
                    f"the job's worker died {current.attempt} times while running it; it was "
                    "stopped so that it can't take down more workers: check the model, or raise "
                    "MODELQ_MAX_ATTEMPTS", attempts=current.attempt), attempt=attempt)
                return Outcome.done
            message, changes = self._start_changes(current, opening)
            record = self.store.transition(job_id, JobStatus.running, message=message,
                                           only_from=frozenset({current.status}), **changes)
            if record is None:
                return Outcome.done
        for observer in self.observers:
            observer.job_started(record)
        log.info("job %s: %s attempt %d on %s", job_id, job.kind, record.attempt, record.worker)
        timeout = (job.timeout_seconds if isinstance(job, LoadJob) else None) or self.default_timeout
        guard = JobGuard(job_id, job, timeout=timeout,
                         report=lambda stage, progress, note: self._report(job_id, stage, progress, note),
                         cancel_requested=lambda: self._cancel_requested(job_id),
                         faults=self.faults, on_stuck=lambda: self._stuck(job_id, timeout),
                         announced=opening[0] if opening else None, cancel_seen=started.cancel)
        try:
            with guard:
                result = self._execute(job, guard.reporter)
        except Cancelled as exc:
            release_memory()
            self._end(attempt, JobStatus.cancelled, message=exc.message)
            log.info("job %s: cancelled", job_id)
        except Exception as exc:
            release_memory()
            poisoned = poisons_process(exc)
            error = translate(exc, ref=_ref(job))
            if poisoned:
                error = type(error)(f"{error.message}; the CUDA context of worker {record.worker} is "
                                    "unusable after this error, so the worker exits to be restarted",
                                    **error.details)
            self._fail(job_id, error, attempt=attempt)
            return Outcome.poisoned if poisoned else Outcome.done
        else:
            self.on_change()  # the registry shows the cache as it is before the record says done
            self._end(attempt, JobStatus.succeeded, result=result, message="done",
                      progress=Progress(fraction=1.0))
            log.info("job %s: succeeded (%s)", job_id, result.model_key)
        finally:
            if attempt.final is None or attempt.final.status is not JobStatus.succeeded:
                self.on_change()  # a failed or cancelled job may have changed the cache too
            self._ended(job_id, attempt.final)
        return Outcome.done

    def _end(self, attempt: Attempt, status: JobStatus, **changes: Any) -> JobRecord | None:
        """The attempt's final record, written with its lease and claims released."""
        final = _retrying(attempt.job_id, lambda: self.store.transition(
            attempt.job_id, status, release=attempt.release, **changes))
        attempt.final = final
        attempt.released = final is not None
        return final

    def _release(self, attempt: Attempt) -> None:
        """Drop the attempt's lease and claims when no final record took them along."""
        try:
            self.store.release(attempt.release)
        except redis.RedisError as exc:  # both lapse by themselves (lease TTL, claim TTL)
            log.warning("job %s: could not release its lease and claims: %s", attempt.job_id, exc)

    def _start_changes(self, current: JobRecord | None,
                       opening: tuple[Stage, str] | None) -> tuple[str, dict[str, Any]]:
        """The message and fields that mark a job running as attempt N+1 (`current` None: as
        submitted; N > 0: its previous worker died), in its opening stage when it has one
        (written once, with the start)."""
        spot = self.service.spot
        done = 0 if current is None else current.attempt
        message = f"started on {spot.name}"
        if current is not None and current.status is JobStatus.running:
            message = (f"worker {current.worker} was lost during attempt {done}; "
                       f"attempt {done + 1} started on {spot.name}")
        changes: dict[str, Any] = {"worker": spot.name, "device": spot.device, "attempt": done + 1}
        if opening is not None:
            changes.update(stage=opening[0], progress=Progress(fraction=0.0))
            message = f"{message}: {opening[1]}"
        return message, changes

    def _stuck(self, job_id: str, timeout: float) -> None:
        """Watchdog: the job never reached a check after its deadline; fail it, then exit."""
        self._fail(job_id, TimedOut(
            f"job {job_id} ran past its {timeout:g}s limit and could not be stopped, so its "
            "worker exits to be restarted: raise the job's timeout_seconds or use a smaller model",
            job_id=job_id, timeout_seconds=timeout))
        self.leases.release(job_id)
        self.on_stuck()

    def _execute(self, job: LoadJob | AttachAdapterJob | UnloadJob, reporter: Reporter) -> ModelInfo:
        if isinstance(job, LoadJob):
            return self.service.load(job, reporter)
        if isinstance(job, AttachAdapterJob):
            return self.service.attach(job, reporter)
        return self.service.unload(job, reporter)

    def _ended(self, job_id: str, final: JobRecord | None) -> None:
        if self.observers:
            try:
                final = final or self.store.get(job_id)
            except Exception as exc:  # observers are best effort; the record is what counts
                log.warning("job %s: could not tell observers it ended: %s", job_id, exc)
                return
            for observer in self.observers:
                observer.job_ended(final)

    def _report(self, job_id: str, stage: Stage, progress: Progress | None, message: str | None) -> None:
        try:  # progress is best effort: a Redis restart must not fail the load
            self.store.report(job_id, stage, progress, message)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("job %s: could not report %s progress: %s", job_id, stage.value, exc)

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store.cancel_requested(job_id)
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def _fail(self, job_id: str, exc: ModelqError, only_from: frozenset[JobStatus] | None = None,
              attempt: Attempt | None = None) -> JobRecord | None:
        """Write the job's failed record (with the attempt's lease and claims released)."""
        error = ErrorInfo(type=exc.type, message=scrub(exc.message), retryable=exc.retryable,
                          details={k: scrub(str(v)) for k, v in exc.details.items()})
        log.warning("job %s: failed: %s: %s", job_id, error.type, error.message)
        try:
            if attempt is not None:
                return self._end(attempt, JobStatus.failed, error=error, message=error.message)
            return _retrying(job_id, lambda: self.store.transition(
                job_id, JobStatus.failed, error=error, message=error.message, only_from=only_from))
        except (JobNotFound, redis.RedisError) as failure:
            log.error("job %s: could not record the failure: %s", job_id, failure)
            return None


def _opening(job: AnyJob) -> tuple[Stage, str] | None:
    """The stage a job starts in, written with its start: a load starts by resolving its model
    (worker/service.py reports the same stage first, which the guard then doesn't write again)."""
    if isinstance(job, LoadJob):
        return Stage.resolving, f"resolving {job.model.display}"
    return None


def _ref(job: LoadJob | AttachAdapterJob | UnloadJob) -> str:
    if isinstance(job, LoadJob):
        return job.model.display
    if isinstance(job, AttachAdapterJob):
        return job.adapter.display
    return job.model_key


def _retrying(job_id: str, write: Callable[[], Any]) -> Any:
    """Run `write`, retrying with backoff for up to STORE_RETRY_SECONDS while Redis is away."""
    deadline = time.monotonic() + STORE_RETRY_SECONDS
    delay = 0.5
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: Redis unreachable (%s); retrying its record in %.1fs", job_id, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
