"""One leased attempt of a job: run its handler under a guard and write its final record.

`Recorder` is the runner's writing half: the fields that mark a job running, stage and
progress reports, and the final record (succeeded, failed or cancelled), written with
the attempt's lease and routing claims released in the same script. A final record is
retried with redis-py's backoff while Redis is away (STORE_RETRY_SECONDS at most).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from schemas import Cancelled, ErrorInfo, JobRecord, JobStatus, Progress, Stage, TimedOut
from schemas.errors import JobNotFound, ModelqError
from schemas.jobs import Job
from tasks.state.store import Store
from worker.errors import poisons_process, scrub, translate
from worker.fault_hooks import Faults
from worker.handlers import Claim, Handler
from worker.jobs.guard import GuardHooks, JobGuard, Opened
from worker.jobs.lease import Leases
from worker.jobs.progress import StepSender
from worker.models.cache import release_memory

log = logging.getLogger(__name__)

STORE_RETRY_SECONDS = 120.0
"""How long a finished attempt keeps trying to write its terminal record while Redis is away."""

_RETRY = Retry(ExponentialBackoff(cap=5.0, base=0.25), retries=int(STORE_RETRY_SECONDS // 5) + 4)
"""Backoff 0.5, 1, 2, 4, then 5 s a try: about STORE_RETRY_SECONDS in all."""


class Outcome(enum.Enum):
    """What the task body does with the message after `Runner.run`."""

    done = "done"  # ack it: the job ended (or the message was refused or is stale)
    busy = "busy"  # another live worker runs this job: hand the message back for later
    poisoned = "poisoned"  # ack it, then exit the process (the CUDA context is unusable)


class RunObserver(Protocol):
    """Cross-cutting work around a job (metrics, log context): told when it starts and ends."""

    def job_started(self, record: JobRecord) -> None: ...

    def job_ended(self, record: JobRecord) -> None: ...


@dataclass(frozen=True)
class RunHooks:
    """What the runner tells the rest of the worker."""

    on_change: Callable[[], None] = lambda: None  # the cache may have changed: refresh the registry
    on_stuck: Callable[[], None] = lambda: None  # a job stuck past its deadline: exit the process
    observers: Sequence[RunObserver] = ()


@dataclass
class Attempt:
    """One delivery being run here: its handler, what its final record releases, that record."""

    job_id: str
    job: Job
    handler: Handler
    opening: tuple[Stage, str] | None
    release: tuple[Claim, ...]  # (key, value): this process's lease, the job's routing claims
    final: JobRecord | None = None
    released: bool = False


class Recorder:
    """Writes the records of the attempts one worker runs."""

    def __init__(self, store: Store, leases: Leases, *, worker: tuple[str, str],
                 hooks: RunHooks) -> None:
        self.store = store
        self.leases = leases
        self.name, self.device = worker
        self.hooks = hooks
        self.steps = StepSender()  # a task's step events, written off the job's thread

    def start_changes(self, current: JobRecord | None,
                      opening: tuple[Stage, str] | None) -> tuple[str, dict[str, Any]]:
        """The message and fields that mark a job running as attempt N+1 (`current` None: as
        submitted; N > 0: its previous worker died), in its opening stage when it has one
        (written once, with the start)."""
        done = 0 if current is None else current.attempt
        message = f"started on {self.name}"
        if current is not None and current.status is JobStatus.running:
            message = (f"worker {current.worker} was lost during attempt {done}; "
                       f"attempt {done + 1} started on {self.name}")
        changes: dict[str, Any] = {"worker": self.name, "device": self.device, "attempt": done + 1}
        if opening is not None:
            changes.update(stage=opening[0], progress=Progress(fraction=0.0))
            message = f"{message}: {opening[1]}"
        return message, changes

    def execute(self, attempt: Attempt, timeout: float, faults: Faults, *,
                cancel_seen: bool) -> Outcome:
        """Run the attempt's handler under its guard and write how it ended."""
        guard = self.guard(attempt, timeout, faults, cancel_seen=cancel_seen)
        job = attempt.job
        result: Any = None
        error: BaseException | None = None
        try:
            with guard:
                result = attempt.handler.run(job, guard.reporter)
        except Exception as exc:
            error = exc
        return self.settle(attempt, result, error)

    def guard(self, attempt: Attempt, timeout: float, faults: Faults, *,
              cancel_seen: bool) -> JobGuard:
        """The attempt's guard (deadline, cancel checks, reporter), not yet watching it."""
        job_id = attempt.job_id
        hooks = GuardHooks(
            report=lambda stage, progress, note, metrics: self.report(job_id, stage, progress, note,
                                                                      metrics),
            cancel_requested=lambda: self.cancel_requested(job_id),
            on_stuck=lambda: self._stuck(job_id, timeout))
        return JobGuard(job_id, attempt.job, timeout=timeout, hooks=hooks, faults=faults,
                        opened=Opened(attempt.opening[0] if attempt.opening else None, cancel_seen))

    def settle(self, attempt: Attempt, result: Any, error: BaseException | None) -> Outcome:
        """Write how the attempt ended: succeeded with `result`, or cancelled or failed by `error`."""
        job_id = attempt.job_id
        outcome = Outcome.done
        try:
            if isinstance(error, Cancelled):
                release_memory()
                self.end(attempt, JobStatus.cancelled, message=error.message)
                log.info("job %s: cancelled", job_id)
            elif isinstance(error, Exception):
                release_memory()
                self.fail(job_id, self._error(error, attempt), attempt=attempt)
                outcome = Outcome.poisoned if poisons_process(error) else Outcome.done
            else:
                self.hooks.on_change()  # the registry shows the cache as it is before the record says done
                self.end(attempt, JobStatus.succeeded, result=result, message="done",
                         progress=Progress(fraction=1.0))
                log.info("job %s: succeeded (%s)", job_id, result.model_key)
        finally:
            if attempt.final is None or attempt.final.status is not JobStatus.succeeded:
                self.hooks.on_change()  # a failed or cancelled job may have changed the cache too
            self._ended(job_id, attempt.final)
        return outcome

    def _error(self, exc: Exception, attempt: Attempt) -> ModelqError:
        error = translate(exc, ref=attempt.handler.ref(attempt.job))
        if poisons_process(exc):
            error = type(error)(f"{error.message}; the CUDA context of worker {self.name} is "
                                "unusable after this error, so the worker exits to be restarted",
                                **error.details)
        return error

    def end(self, attempt: Attempt, status: JobStatus, **changes: Any) -> JobRecord | None:
        """The attempt's final record, written with its lease and claims released (after the
        job's step events, which it would otherwise overtake)."""
        self.steps.flush()
        final: JobRecord | None = _RETRY.call_with_retry(
            lambda: self.store.transition(attempt.job_id, status, release=attempt.release, **changes),
            lambda exc: log.warning("job %s: Redis unreachable (%s); retrying its record",
                                    attempt.job_id, exc))
        attempt.final = final
        attempt.released = final is not None
        return final

    def release(self, attempt: Attempt) -> None:
        """Drop the attempt's lease and claims when no final record took them along."""
        try:
            self.store.release(attempt.release)
        except redis.RedisError as exc:  # both lapse by themselves (lease TTL, claim TTL)
            log.warning("job %s: could not release its lease and claims: %s", attempt.job_id, exc)

    def fail(self, job_id: str, exc: ModelqError, only_from: frozenset[JobStatus] | None = None,
             attempt: Attempt | None = None) -> JobRecord | None:
        """Write the job's failed record (with the attempt's lease and claims released)."""
        error = ErrorInfo(type=exc.type, message=scrub(exc.message), retryable=exc.retryable,
                          details={k: scrub(str(v)) for k, v in exc.details.items()})
        log.warning("job %s: failed: %s: %s", job_id, error.type, error.message)
        try:
            if attempt is not None:
                return self.end(attempt, JobStatus.failed, error=error, message=error.message)
            written: JobRecord | None = _RETRY.call_with_retry(
                lambda: self.store.transition(job_id, JobStatus.failed, error=error,
                                              message=error.message, only_from=only_from),
                lambda exc: log.warning("job %s: Redis unreachable (%s); retrying its record",
                                        job_id, exc))
            return written
        except (JobNotFound, redis.RedisError) as failure:
            log.error("job %s: could not record the failure: %s", job_id, failure)
            return None

    def ended_already(self, job_id: str, raw: bytes | None) -> bool:
        """True (and logged) when the job's record is terminal or gone: drop the delivery."""
        if raw is None:
            log.error("job %s: no record; dropping the message", job_id)
            return True
        if JobRecord.model_validate_json(raw).terminal:
            log.info("job %s: already ended; dropping this delivery", job_id)
            return True
        return False

    def report(self, job_id: str, stage: Stage, progress: Progress | None, message: str | None,
               metrics: dict[str, float] | None = None) -> None:
        """A stage or progress event; a task's step (with `metrics`) is sent off this thread
        (worker/jobs/progress.py), anything else after the steps already handed over."""
        if metrics is not None:
            self.steps.send(lambda: self.store.report(job_id, stage, progress, message,
                                                      metrics=metrics))
            return
        self.steps.flush()
        try:  # progress is best effort: a Redis restart must not fail the load
            self.store.report(job_id, stage, progress, message)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("job %s: could not report %s progress: %s", job_id, stage.value, exc)

    def cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store.cancel_requested(job_id)
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def _stuck(self, job_id: str, timeout: float) -> None:
        """Watchdog: the job never reached a check after its deadline; fail it, then exit."""
        self.fail(job_id, TimedOut(
            f"job {job_id} ran past its {timeout:g}s limit and could not be stopped, so its "
            "worker exits to be restarted: raise the job's timeout_seconds or use a smaller model",
            job_id=job_id, timeout_seconds=timeout))
        self.leases.release(job_id)
        self.hooks.on_stuck()

    def _ended(self, job_id: str, final: JobRecord | None) -> None:
        if self.hooks.observers:
            try:
                final = final or self.store.get(job_id)
            except Exception as exc:  # observers are best effort; the record is what counts
                log.warning("job %s: could not tell observers it ended: %s", job_id, exc)
                return
            for observer in self.hooks.observers:
                observer.job_ended(final)
