"""Takes queued job messages that may join a batch off this worker's queues, as Celery would.

A batch starts with the message Celery delivered (worker/jobs/batching.py); `Gatherer`
looks at the oldest messages waiting on the worker's queues for more jobs the batch may
take, and takes each one the way kombu's consumer takes a message: off the queue's list
and into the unacked hash with its index, in one script (tasks/state/lua/batch_take.lua). So a
taken message is never only in this process's memory: a worker killed mid-batch leaves it
in the unacked hash, where the rescue sweep (worker/recovery/rescue.py) or kombu's restore
puts it back, as it does for the message Celery delivered. `ack` removes it once the job's
final record is written, as Celery's late ack does.

Messages with an ETA or countdown (a busy job handed back), or that do not decode as
one modelq job, are left where they are for Celery. This module never changes a job record.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from schemas import Envelope, decode_envelope
from schemas.errors import InvalidJob
from tasks.app import TASK_RUN
from tasks.state.keys import Keys, queue_list
from tasks.state.scripts import script

log = logging.getLogger(__name__)

LOOK_AHEAD = 4
"""A look reads up to this many messages per job still wanted, from each queue's oldest end."""

POLL_SECONDS = 0.002
"""While a batch waits for jobs, its queues are looked at this often."""


@dataclass(frozen=True)
class Taken:
    """A message taken off a queue for a batch: its job payload, and what acks it."""

    payload: Any
    envelope: Envelope
    tag: str  # kombu's delivery tag: its entry in the unacked hash


@dataclass
class Gatherer:
    """Looks for and takes messages off `queues` (this worker's, oldest end first)."""

    client: redis.Redis
    keys: Keys
    queues: Sequence[str]
    refill: Callable[[], int] = lambda: 0  # tenant turns: move the next messages onto the queues
    clock: Callable[[], float] = time.monotonic
    _skipped: set[bytes] = field(default_factory=set)

    def gather(self, wanted: Callable[[Envelope], bool], limit: int, wait: float) -> list[Taken]:
        """Up to `limit` messages whose jobs `wanted` accepts, waiting at most `wait` seconds
        for them (0: only those queued now; a look that finds some always looks again)."""
        deadline = self.clock() + wait
        taken: list[Taken] = []
        self._skipped.clear()
        while len(taken) < limit:
            self.refill()
            found = self._look(wanted, limit - len(taken))
            taken += found
            if found:
                continue
            left = deadline - self.clock()
            if left <= 0:
                break
            time.sleep(min(POLL_SECONDS, left))
        return taken

    def ack(self, taken: Taken) -> None:
        """The job's final record is written: forget its message (Celery's late ack)."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(self.keys.unacked_index(), taken.tag)
                pipe.hdel(self.keys.unacked(), taken.tag)
                pipe.execute()
        except redis.RedisError as exc:  # the stale entry is dropped when it comes back
            log.warning("job %s: could not ack its batched message: %s", taken.envelope.job_id, exc)

    def _look(self, wanted: Callable[[Envelope], bool], count: int) -> list[Taken]:
        taken: list[Taken] = []
        span = LOOK_AHEAD * count
        with self.client.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                pipe.lrange(queue_list(queue), -span, -1)
            lists = cast(list[list[bytes]], pipe.execute())
        for queue, raws in zip(self.queues, lists, strict=True):
            for raw in reversed(raws):  # oldest first: kombu pushes left and pops right
                if len(taken) >= count:
                    return taken
                if raw in self._skipped:
                    continue
                found = self._take(queue, raw, wanted)
                if found is None:
                    self._skipped.add(raw)
                else:
                    taken.append(found)
        return taken

    def _take(self, queue: str, raw: bytes, wanted: Callable[[Envelope], bool]) -> Taken | None:
        decoded = job_message(raw)
        if decoded is None:
            return None
        message, payload, envelope = decoded
        if not wanted(envelope):
            return None
        properties = message["properties"]
        delivery = properties.get("delivery_info") or {}
        tag = str(properties["delivery_tag"])
        entry = json.dumps([message, delivery.get("exchange", ""),
                            delivery.get("routing_key", queue)])
        took = script(self.client, "batch_take")(
            keys=[queue_list(queue), self.keys.unacked(), self.keys.unacked_index()],
            args=[raw, tag, entry, time.time()])
        return Taken(payload, envelope, tag) if took else None


def job_message(raw: bytes) -> tuple[dict[str, Any], Any, Envelope] | None:
    """(kombu message, job payload, envelope) of a queued `modelq.run` message with no ETA;
    None for anything else (left for Celery, which refuses or holds it as it always does)."""
    try:
        message = json.loads(raw)
        headers, properties = message["headers"], message["properties"]
        if headers.get("task") != TASK_RUN or headers.get("eta") or headers.get("countdown"):
            return None
        if "delivery_tag" not in properties:
            return None
        body = message["body"]
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        if len(args) != 1 or kwargs:
            return None
        payload = args[0]
        return message, payload, decode_envelope(payload)
    except (InvalidJob, ValueError, KeyError, TypeError, AttributeError):
        return None
