"""Batches across jobs: queued run jobs that may share one call of their task run together.

When Celery delivers a run job of a batchable task (worker/modeltasks/registry.py), the
`Batcher` takes the queued jobs that may share its call off this worker's queues
(worker/jobs/gather.py: up to `batch_max_jobs` in all, waiting at most `batch_wait_ms`
after the first), starts each one as a delivery of its own (its lease taken, its record
running, attempt N+1 after a lost worker: `Runner.admit`), hands them to the handler's
`run_batch` together, and writes each job's own final record and acks its message.

Each job keeps what it has alone: its record and events, its lease (renewed by the
heartbeat while the batch runs), its deadline and cancel flag (a `BatchGuard` checks all
of them for the shared call: one round trip for every flag), its tenant checks and its
own error. A worker killed mid-batch leaves every job `running` with its message in the
unacked hash: the rescue sweep puts each one back, and the next attempt runs it once.

What shares a call, and how a bad job fails alone, is the handler's
(worker/handlers/run_batch.py); this module knows nothing of models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from schemas import Cancelled, Envelope, TimedOut
from schemas.errors import ModelqError
from tasks import logs
from worker.jobs.attempt import Outcome
from worker.jobs.gather import Gatherer, Taken
from worker.jobs.guard import CANCEL_POLL_SECONDS, WATCHDOG, JobGuard
from worker.jobs.progress import Reporter
from worker.jobs.runner import Begun, Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOptions:
    """How many jobs one batch takes, and how long it waits for them after the first."""

    max_jobs: int = 32
    wait_seconds: float = 0.010


@dataclass
class Member:
    """One job of a batch as the handler sees it: its job, reporter, and how it ended."""

    job_id: str
    job: Any
    reporter: Reporter
    guard: JobGuard
    result: Any = None
    error: BaseException | None = None
    stop: ModelqError | None = None  # cancelled or timed out while a shared call ran


StopCheck = Callable[[Sequence[Member]], None]
"""Raises the Cancelled or TimedOut of the first of these members asked to stop (and sets
its `stop`): a shared call's `check_cancel`."""


class BatchHandler(Protocol):
    """What a handler offers for batches: which jobs may share a call, and the shared run."""

    def batch_key(self, job: Any) -> Hashable | None:
        """Jobs with equal keys may share a call; None: the job runs alone."""

    def run_batch(self, members: Sequence[Member], check: StopCheck) -> int:
        """Run the members, setting each one's `result` or `error`; the largest number of
        jobs that shared one call."""


@dataclass
class Batcher:
    """Runs a delivered job together with the queued jobs that may share its call."""

    handler: BatchHandler
    gatherer: Gatherer
    options: BatchOptions = field(default_factory=BatchOptions)
    on_batch: Callable[[int], None] = lambda size: None  # metrics: jobs in a shared call

    def takes(self, begun: Begun) -> bool:
        return self.options.max_jobs > 1 and self.handler.batch_key(begun.attempt.job) is not None

    def run(self, first: Begun, runner: Runner) -> Outcome:
        key = self.handler.batch_key(first.attempt.job)

        def wanted(envelope: Envelope) -> bool:
            return (envelope.job_id != first.attempt.job_id
                    and self.handler.batch_key(envelope.job) == key)

        taken = self.gatherer.gather(wanted, self.options.max_jobs - 1, self.options.wait_seconds)
        joined: list[tuple[Begun, Taken | None]] = [(first, None)]
        for message in taken:
            begun = self._admit(runner, message)
            if begun is not None:
                joined.append((begun, message))
        try:
            return self._run(joined, runner)
        finally:
            for begun, taken_message in joined[1:]:
                runner.finish(begun.attempt)
                if taken_message is not None and begun.attempt.final is not None:
                    self.gatherer.ack(taken_message)

    def _admit(self, runner: Runner, message: Taken) -> Begun | None:
        """Start a taken message's job; None when it does not run here (its message acked,
        or left in the unacked hash for the rescue sweep when another worker runs it)."""
        try:
            begun = runner.admit(message.payload)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("job %s: Redis unreachable as it joined a batch (%s); the rescue sweep "
                        "puts its message back", message.envelope.job_id, exc)
            return None
        if isinstance(begun, Begun):
            return begun
        if begun is Outcome.done:
            self.gatherer.ack(message)
        return None

    def _run(self, joined: list[tuple[Begun, Taken | None]], runner: Runner) -> Outcome:
        members = []
        for begun, _ in joined:
            attempt = begun.attempt
            guard = runner.recorder.guard(attempt, runner.time_limit(attempt.handler, attempt.job),
                                          runner.options.faults,
                                          cancel_seen=begun.cancel)
            members.append(Member(attempt.job_id, attempt.job, guard.reporter, guard))
        tenants = {member.job.tenant for member in members}  # log lines of the call name every job
        logs.set_job(",".join(m.job_id for m in members), tenants.pop() if len(tenants) == 1 else None)
        soonest = min(members, key=lambda m: m.guard.deadline)
        WATCHDOG.watch(soonest.job_id, time.monotonic() + max(0.0, soonest.guard.deadline
                                                              - time.monotonic()),
                       soonest.guard.on_stuck)
        try:
            shared = self.handler.run_batch(members, BatchGuard(runner).check)
        except Exception as exc:  # a fault of the batch itself: every job not ended fails with it
            log.exception("batch of %d jobs failed", len(members))
            shared = 1
            for member in members:
                if member.result is None and member.error is None:
                    member.error = exc
        finally:
            WATCHDOG.clear(soonest.job_id)
        self.on_batch(shared)
        if shared > 1:
            log.info("batch of %d jobs on one call (%s)", shared, members[0].job_id)
        outcome = Outcome.done
        for (begun, _), member in zip(joined, members, strict=True):
            ended = runner.recorder.settle(begun.attempt, member.result, member.error)
            if ended is Outcome.poisoned:
                outcome = ended
        return outcome


class BatchGuard:
    """Deadlines and cancel flags of the jobs sharing a call, checked together: each job's
    deadline at every check, their cancel flags in one round trip at most every
    CANCEL_POLL_SECONDS."""

    def __init__(self, runner: Runner, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = runner.store
        self.clock = clock
        self._looked = clock()

    def check(self, members: Sequence[Member]) -> None:
        now = self.clock()
        for member in members:
            if now >= member.guard.deadline:
                try:
                    member.guard.check()
                except (TimedOut, Cancelled) as exc:
                    member.stop = exc
                    raise
        if now - self._looked < CANCEL_POLL_SECONDS:
            return
        self._looked = now
        try:
            with self.store.redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.exists(self.store.keys.cancel(member.job_id))
                flags = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            return
        for member, flag in zip(members, flags, strict=True):
            if flag:
                member.stop = Cancelled("cancelled on request")
                raise member.stop
