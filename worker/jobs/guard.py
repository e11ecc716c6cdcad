"""What stops a running job early: a cancel request, its deadline, and a watchdog for stuck jobs.

The solo pool has no Celery time limits, so the worker enforces a job's timeout
itself. A `JobGuard` builds the job's Reporter: every stage change and every
(throttled) progress tick first checks the deadline (TimedOut) and the cancel
flag (Cancelled; read from Redis at most every CANCEL_POLL_SECONDS), so a long weight
load stops within a tick, not at its end.
Test hooks (worker/fault_hooks.py) run on each stage change.

If the job's thread never reaches a check (stuck in native code), the watchdog
calls `on_stuck` GRACE_SECONDS after the deadline: a thread can't be interrupted
safely, so the runner fails the job and the process exits for its supervisor.
One watchdog thread serves every job of the process (starting a thread per job
cost more than a cache hit's own work).

This module never writes a record itself; `report` does (tasks/state/store.py via the runner).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from schemas import Cancelled, Progress, Stage, TimedOut
from schemas.jobs import Job
from worker.fault_hooks import Faults
from worker.jobs.progress import Reporter

log = logging.getLogger(__name__)

GRACE_SECONDS = 30.0
"""How long past its deadline a job that never reaches a check may run before the process exits."""

CANCEL_POLL_SECONDS = 0.1
"""Checks closer together than this share one look at the cancel flag (a Redis round trip)."""

Report = Callable[[Stage, Progress | None, str | None, dict[str, float] | None], None]


@dataclass(frozen=True)
class GuardHooks:
    """Where a guard reports stages, asks about cancels, and calls when the job is stuck."""

    report: Report
    cancel_requested: Callable[[], bool]
    on_stuck: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Opened:
    """What the job's start wrote or read already: its opening stage, its cancel flag."""

    stage: Stage | None = None  # written with the start: not written again
    cancel: bool | None = None  # read with the lease: counts as the first look


class JobGuard:
    """Deadline, cancel checks and fault hooks around one attempt of one job."""

    def __init__(self, job_id: str, job: Job, *, timeout: float, hooks: GuardHooks,
                 faults: Faults | None = None, clock: Callable[[], float] = time.monotonic,
                 opened: Opened = Opened()) -> None:
        self.job_id = job_id
        self.job = job
        self.timeout = timeout
        self._report = hooks.report
        self._cancel_requested = hooks.cancel_requested
        self.faults = faults or Faults()
        self.on_stuck = hooks.on_stuck
        self._clock = clock
        self.deadline = clock() + timeout
        self._stage: Stage | None = None
        self._announced = opened.stage
        self._cancel_looked_at: float | None = None if opened.cancel is None else clock()
        self._cancel_asked = bool(opened.cancel)
        self.reporter = Reporter(self._emit, self.cancelled)

    def check(self) -> None:
        """TimedOut past the deadline; Cancelled when a cancel was asked for."""
        if self._clock() >= self.deadline:
            raise TimedOut(f"job {self.job_id} ran past its {self.timeout:g}s limit and was stopped: "
                           "raise the job's timeout_seconds (or MODELQ_MAX_LOAD_SECONDS, "
                           "MODELQ_MAX_RUN_SECONDS for run jobs) or use a smaller model",
                           job_id=self.job_id, timeout_seconds=self.timeout)
        now = self._clock()
        if self._cancel_looked_at is None or now - self._cancel_looked_at >= CANCEL_POLL_SECONDS:
            self._cancel_looked_at = now
            self._cancel_asked = self._cancel_requested()
        if self._cancel_asked:
            raise Cancelled("cancelled on request")

    def cancelled(self) -> bool:
        """The service's stage-boundary question; a passed deadline raises TimedOut instead."""
        try:
            self.check()
        except Cancelled:
            return True
        return False

    def _emit(self, stage: Stage, progress: Progress | None, message: str | None,
              metrics: dict[str, float] | None = None) -> None:
        self.check()
        announced, self._announced = self._announced, None
        if stage is not announced or (progress is not None and progress.fraction > 0):
            self._report(stage, progress, message, metrics)
        if stage is not self._stage:
            self._stage = stage
            self.faults.on_stage(self.job, stage, self.reporter)

    def __enter__(self) -> JobGuard:
        WATCHDOG.watch(self.job_id, time.monotonic() + max(0.0, self.deadline - self._clock()),
                       self.on_stuck)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        WATCHDOG.clear(self.job_id)


class Watchdog:
    """One thread that calls the watched job's `on_stuck` once it is `grace` seconds past its
    deadline without having ended (the solo pool runs one job at a time)."""

    def __init__(self, grace: float = GRACE_SECONDS) -> None:
        self.grace = grace
        self._changed = threading.Condition()
        self._watched: tuple[str, float, Callable[[], None]] | None = None
        self._thread: threading.Thread | None = None

    def watch(self, job_id: str, deadline: float, on_stuck: Callable[[], None]) -> None:
        """Watch `job_id` until `clear`; `deadline` is on time.monotonic's clock."""
        with self._changed:
            self._watched = (job_id, deadline, on_stuck)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="modelq-watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()

    def clear(self, job_id: str) -> None:
        with self._changed:
            if self._watched is not None and self._watched[0] == job_id:
                self._watched = None
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._watched is None:
                    self._changed.wait()
                    continue
                job_id, deadline, on_stuck = self._watched
                left = deadline + self.grace - time.monotonic()
                if left > 0:  # a job with no time limit: until it ends
                    self._changed.wait(left if math.isfinite(left) else None)
                    continue
                self._watched = None
            log.error("job %s: stuck %.0fs past its deadline without reaching a check", job_id,
                      self.grace)
            on_stuck()


WATCHDOG = Watchdog()
