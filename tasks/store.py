"""Job records and event streams in Redis: the one place a job's status changes (no torch).

Each change is one mapping (status, its timestamp, worker, result or error) written
with its event atomically, so a cancel and a worker's update never overwrite each
other: a compare-and-set script against the value this store last saw (one round
trip, the worker's usual case), else MULTI/EXEC under WATCH. A terminal record
never changes again. A worker's first attempt starts with its lease taken in the
same script (`start`), and a cache hit goes from queued to succeeded in one
(`run_through`); the Lua lives in tasks/record_scripts.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from schemas import TERMINAL, Event, JobKind, JobNotFound, JobRecord, JobStatus, Progress, Stage
from schemas.records import JobSpec
from tasks import record_scripts as scripts
from tasks.connection import text
from tasks.keys import Keys

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 10_000


def now() -> datetime:
    return datetime.now(UTC)


def submitted(job_id: str, job: JobSpec, at: datetime) -> JobRecord:
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


def not_found(job_id: str) -> JobNotFound:
    """The error for a job id with no record (also what another tenant's job looks like)."""
    return JobNotFound(f"no job {job_id!r}: check the id (records expire after a week)",
                       job_id=job_id)


class Store:
    """Reads and writes records and events under `keys`."""

    def __init__(self, client: redis.Redis, keys: Keys, record_ttl: int) -> None:
        self.redis = client
        self.keys = keys
        self.record_ttl = record_ttl
        self._seen: dict[str, tuple[bytes | str, JobRecord]] = {}  # job id -> last read/written
        self._cas_script = client.register_script(scripts.CAS)
        self.create_script = client.register_script(scripts.CREATE)
        self._release_script = client.register_script(scripts.RELEASE)
        self._start_script = client.register_script(scripts.START)
        self._run_through_script = client.register_script(scripts.RUN_THROUGH)

    # --- reading -------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.get(self.keys.job(job_id))
        if raw is None:
            raise not_found(job_id)
        return self.adopt(job_id, raw)

    def adopt(self, job_id: str, raw: bytes | str) -> JobRecord:
        """The record from `raw`, read by another path (a lease taken in the same round trip)."""
        record = JobRecord.model_validate_json(raw)
        self._remember(job_id, raw, record)
        return record

    def events(self, job_id: str, after: str = "0-0", block_ms: int | None = None,
               count: int = 200) -> list[tuple[str, Event]]:
        """Events after stream id `after`, waiting up to `block_ms` for the first."""
        reply = self.redis.xread({self.keys.events(job_id): after}, count=count, block=block_ms)
        out: list[tuple[str, Event]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    out.append((text(entry_id), Event.model_validate_json(fields[_field(fields)])))
                except (KeyError, ValueError):  # not written by modelq: readers go on past it
                    log.warning("job %s: skipping a malformed event %s", job_id, text(entry_id))
        return out

    def ended(self, job_id: str, block_ms: int) -> JobRecord | None:
        """The terminal record once the job ends, waiting up to `block_ms`; None meanwhile."""
        reply = self.redis.xread({self.keys.done(job_id): "0-0"}, count=1, block=block_ms)
        for _stream, entries in reply or []:
            for _entry_id, fields in entries:
                raw = fields.get(b"record", fields.get("record"))
                return JobRecord.model_validate_json(raw)
        return None

    # --- writing -------------------------------------------------------------------

    def start(self, record: JobRecord, lease: tuple[str, str, int], *, message: str | None,
              **changes: Any) -> Started:
        """Take the job's lease (key, token, ttl ms: SET NX) and, if the lease is the caller's
        and the stored record is still `record` (as submitted), mark it running with `changes`:
        one round trip for a first attempt. Anything else is left to the caller, who reads
        `Started.current` and uses `transition`.
        """
        job_id = record.job_id
        outcome = self._next(job_id, record, JobStatus.running, message, None, changes)
        assert outcome is not None, "start() takes a record as submitted (queued)"
        running, running_json, event_json = outcome
        key, token, ttl_ms = lease
        holder, wrote, current, cancel = self._start_script(
            keys=[key, self.keys.job(job_id), self.keys.events(job_id), self.keys.cancel(job_id)],
            args=[token, ttl_ms, record.model_dump_json(), running_json, self.record_ttl,
                  EVENTS_MAXLEN, event_json])
        if wrote:
            self._remember(job_id, running_json, running)
        return Started(holder=text(holder), record=running if wrote else None,
                       current=current or None, cancel=bool(cancel))

    def create(self, record: JobRecord, *, open_jobs: bool = False) -> None:
        """Write a new record with its first event; refuses to overwrite an existing job.

        One round trip: the record, its event and its place in the tenant's job index
        (and, with `open_jobs`, in the tenant's open jobs that quotas count).
        """
        keys, args = self.create_call(record, open_jobs=open_jobs)
        self.created(record, self.create_script(keys=keys, args=args))

    def create_call(self, record: JobRecord, *, open_jobs: bool = False) -> tuple[list[str], list[Any]]:
        """`create`'s script arguments (keys, args), for a caller that pipelines it."""
        event = _event(record, "submitted").model_dump_json()
        index = [self.keys.jobs(record.tenant)] + ([self.keys.open_jobs(record.tenant)] if open_jobs else [])
        return ([self.keys.job(record.job_id), self.keys.events(record.job_id), *index],
                [record.model_dump_json(), self.record_ttl, EVENTS_MAXLEN, event,
                 record.created_at.timestamp(), record.job_id])

    @staticmethod
    def created(record: JobRecord, reply: Any) -> None:
        """`create`'s check of its script's reply: ValueError if the job existed already."""
        if not reply:
            raise ValueError(f"job {record.job_id} already exists")

    def delete(self, job_id: str, tenant: str) -> None:
        """Remove a record that was never enqueued (the send failed), and its index entry."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.job(job_id), self.keys.events(job_id), self.keys.cancel(job_id),
                    self.keys.done(job_id))
        pipe.zrem(self.keys.jobs(tenant), job_id)
        pipe.execute()

    def transition(self, job_id: str, status: JobStatus, *, message: str | None = None,
                   only_from: frozenset[JobStatus] | None = None,
                   release: Sequence[tuple[str, str]] = (), **changes: Any) -> JobRecord | None:
        """Move a job to `status` with `changes`; None if it is terminal or not in `only_from`.

        When this store wrote or read the job last, the write is one compare-and-set
        round trip against that value; if anyone changed the record since (a cancel),
        it falls back to reading it under WATCH. `release` holds (key, value) pairs
        deleted along with a write that happens, each only while it still holds its value
        (a job's lease and routing claim, dropped with its final record).
        """
        seen = self._seen.get(job_id)
        if seen is not None:
            outcome = self._next(job_id, seen[1], status, message, only_from, changes)
            if outcome is not None and self._cas(job_id, seen[0], *outcome, release=release):
                return outcome[0]
        key = self.keys.job(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(f"no job {job_id!r}", job_id=job_id)
                    current = JobRecord.model_validate_json(raw)
                    outcome = self._next(job_id, current, status, message, only_from, changes)
                    if outcome is None:
                        pipe.unwatch()
                        return None
                    record, record_json, event_json = outcome
                    pipe.multi()
                    pipe.set(key, record_json, ex=self.record_ttl)
                    pipe.xadd(self.keys.events(job_id), {"event": event_json},
                              maxlen=EVENTS_MAXLEN, approximate=True)
                    if status in TERMINAL:
                        pipe.expire(self.keys.events(job_id), self.record_ttl)
                        pipe.delete(self.keys.cancel(job_id))
                        pipe.xadd(self.keys.done(job_id), {"record": record_json})
                        pipe.expire(self.keys.done(job_id), self.record_ttl)
                    pipe.execute()
                    self._remember(job_id, record_json, record)
                    self.release(release)
                    return record
                except redis.WatchError:
                    continue

    def _next(self, job_id: str, current: JobRecord, status: JobStatus, message: str | None,
              only_from: frozenset[JobStatus] | None,
              changes: dict[str, Any]) -> tuple[JobRecord, str, str] | None:
        """The record after the change, as JSON with its event; None if it may not change."""
        if current.status in TERMINAL or (only_from and current.status not in only_from):
            self._seen.pop(job_id, None)
            return None
        record = current.model_copy(update={"status": status, **_stamps(current, status), **changes})
        return record, record.model_dump_json(), _event(record, message).model_dump_json()

    def run_through(self, record: JobRecord, *, lease: str, started: tuple[str, dict[str, Any]],
                    ended: tuple[str, dict[str, Any]],
                    release: Sequence[tuple[str, str]] = ()) -> JobRecord | None:
        """Start a job as submitted and end it succeeded in one write, with both events
        (`started` and `ended`: message and fields of each); None, writing nothing, when the
        stored record is no longer `record` or someone holds the job's `lease` key."""
        job_id = record.job_id
        begun = self._next(job_id, record, JobStatus.running, started[0], None, started[1])
        assert begun is not None, "run_through() takes a record as submitted (queued)"
        final = self._next(job_id, begun[0], JobStatus.succeeded, ended[0], None, ended[1])
        assert final is not None
        written = self._run_through_script(
            keys=[self.keys.job(job_id), self.keys.events(job_id), self.keys.cancel(job_id),
                  self.keys.done(job_id), lease, *(key for key, _ in release)],
            args=[record.model_dump_json(), final[1], self.record_ttl, EVENTS_MAXLEN, begun[2],
                  final[2], *(value for _, value in release)])
        return final[0] if written else None

    def release(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Delete each (key, value) pair's key while it still holds that value (one round trip)."""
        if pairs:
            self._release_script(keys=[key for key, _ in pairs], args=[value for _, value in pairs])

    def _cas(self, job_id: str, seen: bytes | str, record: JobRecord, record_json: str,
             event_json: str, release: Sequence[tuple[str, str]] = ()) -> bool:
        """Write `record` if the stored value is still `seen` (one round trip)."""
        terminal = record.status in TERMINAL
        written = self._cas_script(
            keys=[self.keys.job(job_id), self.keys.events(job_id), self.keys.cancel(job_id),
                  self.keys.done(job_id), *(key for key, _ in release)],
            args=[seen, record_json, self.record_ttl, EVENTS_MAXLEN, event_json, int(terminal),
                  *(value for _, value in release)])
        if written:
            self._remember(job_id, record_json, record)
        else:
            self._seen.pop(job_id, None)
        return bool(written)

    def _remember(self, job_id: str, raw: bytes | str, record: JobRecord) -> None:
        if record.status in TERMINAL:
            self._seen.pop(job_id, None)
        else:
            self._seen.clear()  # one job at a time is all a worker needs
            self._seen[job_id] = (raw, record)

    def report(self, job_id: str, stage: Stage, progress: Progress | None = None,
               message: str | None = None) -> JobRecord | None:
        """A running job's stage and progress; ignored once the job left `running`."""
        return self.transition(job_id, JobStatus.running, message=message,
                               only_from=frozenset({JobStatus.running}),
                               stage=stage, progress=progress)

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.record_ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))


def _event(record: JobRecord, message: str | None) -> Event:
    return Event(job_id=record.job_id, at=now(), status=record.status, stage=record.stage,
                 progress=record.progress, message=message, worker=record.worker)


def _stamps(current: JobRecord, status: JobStatus) -> dict[str, Any]:
    if status is JobStatus.running and current.status is not JobStatus.running:
        return {"started_at": now(), "stage": None, "progress": None}
    if status in TERMINAL:
        return {"finished_at": now()}
    return {}


def _field(fields: dict[Any, Any]) -> Any:
    return b"event" if b"event" in fields else "event"


def follow(store: Store, job_id: str, timeout: float | None = None,
           poll_ms: int = 1000) -> Iterator[Event]:
    """Yield a job's events from the start until a terminal one (or `timeout` passes)."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    after = "0-0"
    while True:
        block = poll_ms
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            block = max(1, min(poll_ms, int(left * 1000)))
        batch = store.events(job_id, after=after, block_ms=block)
        for entry_id, event in batch:
            after = entry_id  # the next read starts past it
            yield event
            if event.status in TERMINAL:
                return
        if not batch and store.get(job_id).terminal:
            return
