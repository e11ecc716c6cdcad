"""Job records and event streams in Redis: the one place a job's status changes (no torch).

The record protocol
-------------------
A job's keys (tasks/state/keys.py): `job` (the JobRecord JSON), `revision` (an integer that every
write of the record increments; 1 is the record as submitted), `events` (a stream of Event
JSON), `done` (a one-entry stream written with the final record, which waiters block on)
and `cancel` (a flag). A worker also holds the job's `lease`, and a load its routing
claim (`loading`); both go with the job's final record.

Who writes which status:

- the client (tasks/client.py): `queued` on submit (`create`); `cancelled` for a job that
  has not started (`transition(..., only_from={queued, retrying})`); for a started job only
  the cancel flag (`request_cancel`), which the running worker polls between stages.
- the worker (worker/jobs/runner.py): `running` (`start` on a first attempt, `transition` on a
  later one), its stages and progress (`report`: still `running`), and the final record,
  `succeeded`, `failed` or `cancelled` (`transition`, with `release` dropping its lease and
  claim in the same write). A cache hit goes from `queued` to `succeeded` (`run_through`).

A final record never changes again: `_next` refuses any change to one, and every write is
a compare-and-set on the revision, so no write lands on a record its writer did not read.

Which script does which transition (tasks/state/lua/, loaded by tasks/state/scripts.py):

- record_create.lua, `create`: the record at revision 1 (SET NX), its first event and its
  tenant index entries.
- record_write.lua, `transition`/`report`: any later change: written, with its event, only
  while the revision is the one read, which it increments; a final record also ends the
  event stream's life, drops the cancel flag, writes `done` and releases the given keys.
- record_start.lua, `start`: takes the lease and, when it is the caller's and the revision
  is 1, writes `running`.
- record_run_through.lua, `run_through`: `queued` to `succeeded` with both events, when the
  revision is 1 and no one holds the lease.
- release.lua, `release`: compare-and-delete of (key, value) pairs.

Fast paths, one round trip each: `start` (a first attempt: lease and `running` together),
`run_through` (a cache hit), and `transition` when this store wrote or read the record last
(it remembers the revision). Otherwise `transition` reads record and revision (one MGET)
and runs the same compare-and-set again, until it applies or `_next` refuses the change:
the rules for a final record live in Lua only. The scripts compare revisions, never the
record's bytes, so a producer and a worker that render JSON differently (another pydantic,
keys in another order) keep the fast paths. A record older than revisions reads as 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis

from schemas import TERMINAL, Event, Job, JobKind, JobNotFound, JobRecord, JobStatus, Progress, Stage
from tasks.state.connection import MAX_BLOCK_SECONDS, text
from tasks.state.keys import Keys
from tasks.state.scripts import script

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 10_000
SUBMITTED = 1
"""The revision `create` writes: a record at it is still as submitted."""

_Streams = list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]]  # an XREAD reply


def now() -> datetime:
    return datetime.now(UTC)


def submitted(job_id: str, job: Job, at: datetime) -> JobRecord:
    """The record of a job as its client writes it on submit (and a worker can predict it)."""
    return JobRecord(job_id=job_id, kind=JobKind(job.kind), tenant=job.tenant,
                     status=JobStatus.queued, created_at=at, job=job)


@dataclass(frozen=True)
class Started:
    """What `Store.start` found: the lease's holder, and the running record if it wrote one."""

    holder: str  # the lease's token: the caller's own when it took the lease
    record: JobRecord | None  # the running record, when the stored one was still as submitted
    current: bytes | None  # otherwise the record as stored (None: there is none)
    cancel: bool  # a cancel was asked for (a running attempt's flag outlives it)
    revision: int = 0  # the stored record's revision after the script (0: none)


def not_found(job_id: str) -> JobNotFound:
    """The error for a job id with no record (also what another tenant's job looks like)."""
    return JobNotFound(f"no job {job_id!r}: check the id (records expire after a week)",
                       job_id=job_id)


class Store:
    """Reads and writes records and events under `keys`."""

    def __init__(self, client: redis.Redis, keys: Keys, record_ttl: int,
                 blocking: redis.Redis | None = None) -> None:
        self.redis = client
        self.blocking = blocking or client  # XREAD BLOCK: a client whose timeout covers the block
        self.keys = keys
        self.record_ttl = record_ttl
        self._seen: dict[str, tuple[int, JobRecord]] = {}  # job id -> revision, record last seen
        self._offered: tuple[str, bytes, int] | None = None  # start's record, for `adopt`
        self.create_script = script(client, "record_create")  # public: the client pipelines it
        self._write_script = script(client, "record_write")
        self._start_script = script(client, "record_start")
        self._run_through_script = script(client, "record_run_through")
        self._release_script = script(client, "release")

    # --- reading -------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        return self._read(job_id)[1]

    def _read(self, job_id: str) -> tuple[int, JobRecord]:
        """The record and its revision (one round trip); JobNotFound if there is none."""
        raw, revision = self.redis.mget([self.keys.job(job_id), self.keys.revision(job_id)])
        if raw is None:
            raise not_found(job_id)
        record = self.adopt(job_id, raw, int(revision or 0))
        return int(revision or 0), record

    def adopt(self, job_id: str, raw: bytes | str, revision: int | None = None) -> JobRecord:
        """The record from `raw`, read by another path (`Started.current`: a lease taken in
        the same round trip), remembered with its `revision` (known for what `start` returned)
        so that the next `transition` is one round trip."""
        record = JobRecord.model_validate_json(raw)
        offered, self._offered = self._offered, None
        if revision is None and offered is not None and offered[:2] == (job_id, raw):
            revision = offered[2]
        if revision is None:
            self._seen.pop(job_id, None)
        else:
            self._remember(job_id, revision, record)
        return record

    def events(self, job_id: str, after: str = "0-0", block_ms: int | None = None,
               count: int = 200) -> list[tuple[str, Event]]:
        """Events after stream id `after`, waiting up to `block_ms` for the first."""
        reply = cast(_Streams, self.blocking.xread({self.keys.events(job_id): after}, count=count,
                                                   block=_bounded(block_ms)))
        return parse_events(job_id, reply)

    def ended(self, job_id: str, block_ms: int) -> JobRecord | None:
        """The terminal record once the job ends, waiting up to `block_ms`; None meanwhile."""
        reply = cast(_Streams, self.blocking.xread({self.keys.done(job_id): "0-0"}, count=1,
                                                   block=_bounded(block_ms)))
        for _stream, entries in reply or []:
            for _entry_id, fields in entries:
                return JobRecord.model_validate_json(fields[b"record"] if b"record" in fields
                                                     else fields["record"])
        return None

    # --- writing -------------------------------------------------------------------

    def start(self, record: JobRecord, lease: tuple[str, str, int], *, message: str | None,
              **changes: Any) -> Started:
        """Take the job's lease (key, token, ttl ms: SET NX) and, if the lease is the caller's
        and the stored record is still as submitted (revision 1; `record` is what the client
        wrote, rendered by the caller), mark it running with `changes`: one round trip for a
        first attempt. Anything else is left to the caller, who reads `Started.current`
        (`adopt`) and uses `transition`.
        """
        job_id = record.job_id
        outcome = self._next(job_id, record, JobStatus.running, message, None, changes)
        assert outcome is not None, "start() takes a record as submitted (queued)"
        running, running_json, event_json = outcome
        key, token, ttl_ms = lease
        holder, wrote, current, cancel, revision = self._start_script(
            keys=[key, self.keys.job(job_id), self.keys.revision(job_id), self.keys.events(job_id),
                  self.keys.cancel(job_id)],
            args=[token, ttl_ms, SUBMITTED, running_json, self.record_ttl, EVENTS_MAXLEN,
                  event_json])
        if wrote:
            self._remember(job_id, int(revision), running)
        elif current:
            self._offered = (job_id, current, int(revision))
        return Started(holder=text(holder), record=running if wrote else None,
                       current=current or None, cancel=bool(cancel), revision=int(revision))

    def create(self, record: JobRecord, *, open_jobs: bool = False) -> None:
        """Write a new record with its first event; refuses to overwrite an existing job.

        One round trip: the record (revision 1), its event and its place in the tenant's job
        index (and, with `open_jobs`, in the tenant's open jobs that quotas count).
        """
        keys, args = self.create_call(record, open_jobs=open_jobs)
        self.created(record, self.create_script(keys=keys, args=args))

    def create_call(self, record: JobRecord, *, open_jobs: bool = False) -> tuple[list[str], list[Any]]:
        """`create`'s script arguments (keys, args), for a caller that pipelines it."""
        event = _event(record, "submitted").model_dump_json()
        index = [self.keys.jobs(record.tenant), self.keys.unstarted(),
                 *([self.keys.open_jobs(record.tenant)] if open_jobs else [])]
        job_id = record.job_id
        return ([self.keys.job(job_id), self.keys.revision(job_id), self.keys.events(job_id), *index],
                [record.model_dump_json(), self.record_ttl, EVENTS_MAXLEN, event,
                 record.created_at.timestamp(), job_id])

    @staticmethod
    def created(record: JobRecord, reply: Any) -> None:
        """`create`'s check of its script's reply: ValueError if the job existed already."""
        if not reply:
            raise ValueError(f"job {record.job_id} already exists")

    def delete(self, job_id: str, tenant: str) -> None:
        """Remove a record that was never enqueued (the send failed), and its index entry."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.job(job_id), self.keys.revision(job_id), self.keys.events(job_id),
                    self.keys.cancel(job_id), self.keys.done(job_id))
        pipe.zrem(self.keys.jobs(tenant), job_id)
        pipe.zrem(self.keys.unstarted(), job_id)
        pipe.execute()

    def transition(self, job_id: str, status: JobStatus, *, message: str | None = None,
                   only_from: frozenset[JobStatus] | None = None,
                   release: Sequence[tuple[str, str]] = (), metrics: dict[str, float] | None = None,
                   **changes: Any) -> JobRecord | None:
        """Move a job to `status` with `changes`; None if it is terminal or not in `only_from`.

        A compare-and-set on the record's revision: one round trip when this store wrote or
        read the job last; else, or when anyone changed it since (a cancel), the record is
        read again and the change retried on what it is now. `release` holds (key, value)
        pairs deleted along with a write that happens, each only while it still holds its
        value (a job's lease and routing claim, dropped with its final record). `metrics` go
        on the change's event only (a training step's loss).
        """
        seen = self._seen.get(job_id)
        revision, current = seen if seen is not None else self._read(job_id)
        while True:
            outcome = self._next(job_id, current, status, message, only_from, changes, metrics)
            if outcome is None:
                return None
            if self._write(job_id, revision, *outcome, release=release):
                return outcome[0]
            revision, current = self._read(job_id)

    def _next(self, job_id: str, current: JobRecord, status: JobStatus, message: str | None,
              only_from: frozenset[JobStatus] | None,
              changes: dict[str, Any],
              metrics: dict[str, float] | None = None) -> tuple[JobRecord, str, str] | None:
        """The record after the change, as JSON with its event; None if it may not change."""
        if current.status in TERMINAL or (only_from and current.status not in only_from):
            self._seen.pop(job_id, None)
            return None
        record = current.model_copy(update={"status": status, **_stamps(current, status), **changes})
        return record, record.model_dump_json(), _event(record, message, metrics).model_dump_json()

    def run_through(self, record: JobRecord, *, lease: str, started: tuple[str, dict[str, Any]],
                    ended: tuple[str, dict[str, Any]],
                    release: Sequence[tuple[str, str]] = ()) -> JobRecord | None:
        """Start a job as submitted and end it succeeded in one write, with both events
        (`started` and `ended`: message and fields of each); None, writing nothing, when the
        stored record is no longer as submitted (revision 1) or someone holds the job's
        `lease` key."""
        job_id = record.job_id
        begun = self._next(job_id, record, JobStatus.running, started[0], None, started[1])
        assert begun is not None, "run_through() takes a record as submitted (queued)"
        final = self._next(job_id, begun[0], JobStatus.succeeded, ended[0], None, ended[1])
        assert final is not None
        written = self._run_through_script(
            keys=[*self._record_keys(job_id), lease, *(key for key, _ in release)],
            args=[SUBMITTED, final[1], self.record_ttl, EVENTS_MAXLEN, begun[2], final[2],
                  *(value for _, value in release)])
        return final[0] if written else None

    def release(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Delete each (key, value) pair's key while it still holds that value (one round trip)."""
        if pairs:
            self._release_script(keys=[key for key, _ in pairs], args=[value for _, value in pairs])

    def _write(self, job_id: str, revision: int, record: JobRecord, record_json: str,
               event_json: str, release: Sequence[tuple[str, str]] = ()) -> bool:
        """Write `record` if the stored revision is still `revision` (one round trip)."""
        written = self._write_script(
            keys=[*self._record_keys(job_id), *(key for key, _ in release)],
            args=[revision, record_json, self.record_ttl, EVENTS_MAXLEN, event_json,
                  int(record.status in TERMINAL), *(value for _, value in release)])
        if written:
            self._remember(job_id, revision + 1, record)
        else:
            self._seen.pop(job_id, None)
        return bool(written)

    def _record_keys(self, job_id: str) -> list[str]:
        """KEYS 1-5 of the record scripts that write a record: job, revision, events, cancel, done."""
        return [self.keys.job(job_id), self.keys.revision(job_id), self.keys.events(job_id),
                self.keys.cancel(job_id), self.keys.done(job_id)]

    def _remember(self, job_id: str, revision: int, record: JobRecord) -> None:
        if record.status in TERMINAL:
            self._seen.pop(job_id, None)
        else:
            self._seen.clear()  # one job at a time is all a worker needs
            self._seen[job_id] = (revision, record)

    def report(self, job_id: str, stage: Stage, progress: Progress | None = None,
               message: str | None = None, *,
               metrics: dict[str, float] | None = None) -> JobRecord | None:
        """A running job's stage and progress (and a step's metrics, on its event); ignored
        once the job left `running`."""
        return self.transition(job_id, JobStatus.running, message=message,
                               only_from=frozenset({JobStatus.running}), metrics=metrics,
                               stage=stage, progress=progress)

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.record_ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))


def _event(record: JobRecord, message: str | None,
           metrics: dict[str, float] | None = None) -> Event:
    return Event(job_id=record.job_id, at=now(), status=record.status, stage=record.stage,
                 progress=record.progress, message=message, worker=record.worker, metrics=metrics)


def _stamps(current: JobRecord, status: JobStatus) -> dict[str, Any]:
    if status is JobStatus.running and current.status is not JobStatus.running:
        return {"started_at": now(), "stage": None, "progress": None}
    if status in TERMINAL:
        return {"finished_at": now()}
    return {}


def _bounded(block_ms: int | None) -> int | None:
    """A block no longer than the blocking client's socket timeout allows (MAX_BLOCK_SECONDS;
    0, Redis's 'for ever', included)."""
    longest = int(MAX_BLOCK_SECONDS * 1000)
    return None if block_ms is None else min(block_ms or longest, longest)


def parse_events(job_id: str, reply: Any) -> list[tuple[str, Event]]:
    """An XREAD reply on a job's event stream as (stream id, Event) pairs; an entry modelq
    did not write is skipped (logged), so readers go on past it."""
    out: list[tuple[str, Event]] = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            try:  # the field is b"event" or "event" (a client that decodes replies)
                raw = fields[b"event"] if b"event" in fields else fields["event"]
                out.append((text(entry_id), Event.model_validate_json(raw)))
            except (KeyError, ValueError):
                log.warning("job %s: skipping a malformed event %s", job_id, text(entry_id))
    return out
