"""Puts back the jobs that a dead worker or a lost send left with no live message.

Two sweeps, run on the reaper's turn (worker/recovery/reaper.py), so a lost job waits about a
worker TTL, not the broker's visibility timeout (`max_load_seconds + 600`):

- `Redelivery`: a message in kombu's unacked hash (tasks/state/keys.py `Keys.unacked_pairs`) whose
  job is `running` with no lease and whose worker has left the registry (a `kill -9`
  mid-load), or is still `queued` long after it was taken (a worker killed between
  taking a message and starting its job), goes back to its queue the way kombu's own
  restore does it (one WATCH/MULTI on the hash), or to the shared queue when its queue
  was a dead worker's own.
- `Resend`: a `queued` record older than a grace period whose message is in no queue and
  no unacked entry (a Redis failure between writing the record and sending its message)
  is sent again, built from the record alone and signed for its tenant. It looks for the
  old jobs' messages where they wait, oldest first, and stops when it has found them: a
  long backlog is not read whole on every turn.

Either may deliver a job twice in a rare race; the runner's lease and record checks make
a second delivery harmless (worker/jobs/runner.py). This module never changes a job record.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import redis

from schemas import JobRecord, JobStatus
from schemas.jobs import Envelope
from tasks.auth import sign
from tasks.settings import Settings
from tasks.state.connection import text
from tasks.state.keys import Keys, queue_list
from tasks.tenants import Tenants, pick_queue

log = logging.getLogger(__name__)

BATCH = 500
"""Entries one sweep looks at, oldest first; the rest wait for the next turn."""

CHUNK = 500
"""Messages read from a queue at a time, and queues read in one round trip, by `Resend`."""

Send = Callable[[JobRecord], str]
"""Sends a job's message again, built from its record; returns the queue it went to."""


def message_id(message: Any) -> str | None:
    """The task id (modelq's job id) of a kombu message dict, or None if it names none."""
    try:
        value = message["headers"]["id"]
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _records(client: redis.Redis, keys: Keys, job_ids: list[str]) -> list[JobRecord | None]:
    raws = cast(list[bytes | None], client.mget([keys.job(j) for j in job_ids])) if job_ids else []
    out: list[JobRecord | None] = []
    for raw in raws:
        try:
            out.append(JobRecord.model_validate_json(raw) if raw is not None else None)
        except ValueError:  # not a record modelq wrote: leave it alone
            out.append(None)
    return out


class Redelivery:
    """Restores the unacked messages of jobs whose worker died."""

    def __init__(self, client: redis.Redis, keys: Keys, *, worker_ttl: float, grace: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.keys = keys
        self.worker_ttl = worker_ttl  # a younger entry's taker may still be starting its job
        self.grace = grace  # a `queued` job's entry older than this was taken by a dead worker
        self._clock = clock

    def run(self) -> int:
        """Restore every lost job's message; how many were put back."""
        return sum(self._sweep(unacked, index) for unacked, index in self.keys.unacked_pairs())

    def _sweep(self, unacked: str, index_key: str) -> int:
        now = self._clock()
        index = cast(list[tuple[bytes, float]], self.redis.zrangebyscore(
            index_key, "-inf", now - self.worker_ttl, start=0, num=BATCH, withscores=True))
        if not index:
            return 0
        tags = [text(tag) for tag, _ in index]
        raws = cast(list[bytes | None], self.redis.hmget(unacked, tags))
        found = [(tag, taken, job_id)
                 for tag, (_, taken), raw in zip(tags, index, raws, strict=True)
                 if (job_id := message_id(_entry(raw)[0])) is not None]
        records = _records(self.redis, self.keys, [job_id for *_, job_id in found])
        restored = 0
        for (tag, taken, _), record in zip(found, records, strict=True):
            if record is not None and self._lost(record, now - taken):
                restored += self._restore((unacked, index_key), tag, record)
        return restored

    def _lost(self, record: JobRecord, age: float) -> bool:
        if record.status in (JobStatus.queued, JobStatus.retrying):
            return age >= self.grace
        if record.status is not JobStatus.running:
            return False  # ended: the message is stale, and the runner drops it when it comes
        if self.redis.exists(self.keys.lease(record.job_id)):
            return False
        return record.worker is None or not self.redis.exists(self.keys.worker(record.worker))

    def _restore(self, unacked: tuple[str, str], tag: str, record: JobRecord) -> int:
        """Move entry `tag` from the unacked hash back onto a queue, as kombu's restore does."""
        moved: list[str] = []
        unacked_hash, index = unacked

        def restore(pipe: Any) -> None:
            message, _exchange, routing_key = _entry(pipe.hget(unacked_hash, tag))
            destination = self._destination(routing_key) if message is not None else None
            pipe.multi()
            pipe.zrem(index, tag)
            pipe.hdel(unacked_hash, tag)
            if message is not None and destination is not None:
                _mark_redelivered(message)
                pipe.rpush(queue_list(destination), json.dumps(message))  # taken next (BRPOP)
                moved[:] = [destination]

        self.redis.transaction(restore, unacked_hash)
        if moved:
            what = (f"its worker {record.worker} is gone" if record.status is JobStatus.running
                    else "the worker that took it never started it")
            log.warning("job %s: %s; put its message back on %s (attempt %d ran)", record.job_id,
                        what, moved[0], record.attempt)
        return 1 if moved else 0

    def _destination(self, routing_key: Any) -> str | None:
        """The queue to put a message back on: its own, or the shared one for a dead worker's."""
        if not isinstance(routing_key, str) or not routing_key:
            return None
        target = self.keys.orphan_destination(routing_key)
        if target is not None and not self.redis.exists(self.keys.worker(target[0])):
            return target[1]
        return routing_key


class Resend:
    """Sends again the `queued` jobs whose message was lost before it reached a queue."""

    def __init__(self, client: redis.Redis, keys: Keys, send: Send, *, grace: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.keys = keys
        self.send = send
        self.grace = grace  # a submit sends its message right after writing the record
        self._clock = clock

    def run(self) -> int:
        """Send every lost queued job again; how many were sent."""
        now = self._clock()
        index = self.keys.unstarted()
        ids = [text(i) for i in cast(list[bytes], self.redis.zrangebyscore(
            index, "-inf", now - self.grace, start=0, num=BATCH))]
        if not ids:
            return 0
        records = _records(self.redis, self.keys, ids)
        started = [i for i, r in zip(ids, records, strict=True) if r is None or r.attempt > 0
                   or r.status is not JobStatus.queued]
        if started:
            self.redis.zrem(index, *started)
        waiting = [r for r in records if r is not None and r.attempt == 0
                   and r.status is JobStatus.queued]
        if not waiting:
            return 0
        present = self._on_broker({r.job_id for r in waiting})
        lost = [r for r in waiting if r.job_id not in present]
        self.redis.zadd(index, {r.job_id: now for r in waiting}, xx=True)  # seen: next look later
        return sum(self._send(record) for record in lost)

    def _send(self, record: JobRecord) -> int:
        current = _records(self.redis, self.keys, [record.job_id])[0]
        if current is None or current.status is not JobStatus.queued or current.attempt > 0:
            return 0  # taken meanwhile
        queue = self.send(current)
        log.warning("job %s: queued %.0fs ago with no message on any queue (a send lost to a "
                    "Redis failure, or a worker killed as it took it); sent it again to %s",
                    record.job_id, self._clock() - record.created_at.timestamp(), queue)
        return 1

    def _on_broker(self, wanted: set[str] | None = None) -> set[str]:
        """Job ids of messages waiting on a queue or taken and not acked: all of them, or enough
        to tell which of `wanted` have one.

        For `wanted`, it looks where waiting jobs are: the unacked hashes, then the shared
        queue and every registered worker's own queue, each read from the end messages are
        taken from, oldest first (the jobs asked about are old ones), and left once every
        wanted id is found: a busy pool's backlog costs a few reads, not a read of every
        message. Only an id still missing then (a message truly lost, or one on a tenant
        share) makes it list every queue of the prefix with SCAN and read them whole.
        """
        ids: set[str] = set()
        for unacked, _ in self.keys.unacked_pairs():
            for raw in cast(Iterable[bytes], self.redis.hvals(unacked)):
                ids.add(message_id(_entry(raw)[0]) or "")
        if wanted is not None:
            workers = cast(list[bytes], self.redis.zrange(self.keys.deadlines(), 0, -1))
            names = [self.keys.queue(), *(self.keys.worker_queue(text(w)) for w in workers)]
            for start in range(0, len(names), CHUNK):
                if wanted <= ids:
                    return ids
                self._oldest(names[start:start + CHUNK], ids, wanted)
            if wanted <= ids:
                return ids
        for pattern in self.keys.queue_patterns():
            for name in self.redis.scan_iter(match=pattern, count=500, _type="LIST"):
                for raw in cast(list[bytes], self.redis.lrange(name, 0, -1)):
                    ids.add(message_id(_loads(raw)) or "")
        return ids

    def _oldest(self, names: list[str], ids: set[str], wanted: set[str]) -> None:
        """Read queues `names` into `ids`, CHUNK messages at a time from their taking end, one
        round trip per step for all of them, until each is read or every wanted id found."""
        end = -1
        while names and not wanted <= ids:
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.lrange(queue_list(name), end - CHUNK + 1, end)
            chunks = cast(list[list[bytes]], pipe.execute())
            for chunk in chunks:
                ids.update(message_id(_loads(raw)) or "" for raw in chunk)
            names = [name for name, chunk in zip(names, chunks, strict=True) if len(chunk) == CHUNK]
            end -= CHUNK


def _loads(raw: bytes | str | None) -> Any:
    """A kombu JSON value; None for nothing or bytes that are not JSON."""
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


def _entry(raw: bytes | str | None) -> tuple[Any, Any, Any]:
    """(message, exchange, routing key) of an unacked hash value; Nones if it is not one."""
    value = _loads(raw)
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], dict):
        return value[0], value[1], value[2]
    return None, None, None


def celery_send(settings: Settings, tenants: Tenants) -> Send:
    """A `Send` through a Celery app of its own (the heartbeat thread sends with it): the
    record's own job and submit time, signed with its tenant's key in a multi-tenant pool,
    to the shared queue (the tenant's share of it)."""
    from tasks.app import TASK_RUN, create_app

    apps: list[Any] = []  # built on first use: most turns send nothing

    def send(record: JobRecord) -> str:
        if not apps:
            apps.append(create_app(settings))
        payload = Envelope(job_id=record.job_id, submitted_at=record.created_at,
                           job=record.job).model_dump(mode="json")
        queue = Keys(settings.key_prefix).queue()
        if tenants.multi:
            tenant = tenants[record.tenant]
            payload = sign(payload, tenant.key, tenant=record.tenant,
                           ttl_seconds=settings.signature_ttl_seconds)
            queue = pick_queue(record.tenant, tenant.limits(), record.job_id, queue)
        apps[0].send_task(TASK_RUN, args=[payload], task_id=record.job_id, queue=queue,
                      argsrepr=f"<{record.kind.value} job {record.job_id}>", kwargsrepr="{}")
        return queue

    return send


def _mark_redelivered(message: Any) -> None:
    """As kombu's `_do_restore_message`: the message says it was delivered before."""
    try:
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):
        pass
