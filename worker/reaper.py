"""Hands the jobs of dead workers to live ones, so none waits for a worker that is gone.

Loads are routed to one worker's own queue; when that worker dies, the jobs queued
behind it would wait in a queue nobody consumes. Every live worker runs `maybe_run`
from its heartbeat; one of them per period takes the turn (`Keys.reaper_turn`, SET NX
with a TTL) and reaps its prefix's dead workers: those whose deadline passed
(`Keys.deadlines`, a sorted set: no scan of the registry or the keyspace). One script per
dead worker removes its routing index entries and moves each of its own queues (its memo
lists them, tenant shares included), oldest first, onto the matching shared queue
(attach/unload jobs then fail cleanly as ModelNotFound: their model died with the
worker); then the turn runs the sweeps it was given
(worker/rescue.py: the message of a job its dead worker was running, put back within
a worker TTL or two instead of the broker's visibility timeout; a queued job whose
message was lost, sent again).

Queue names come from tasks/keys.py; this module never changes a job record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis

from tasks.connection import text
from tasks.keys import Keys
from tasks.scripts import script

log = logging.getLogger(__name__)

BATCH = 100
"""Dead workers one turn reaps, longest dead first; the rest wait for the next turn."""

TASKS_KEPT_SECONDS = 86400.0
"""How long a task no live worker offers any more stays in `Keys.tasks_offered`."""


class Reaper:
    """Moves orphaned worker queues to the shared queue and runs the rescue sweeps, at most
    every `every` seconds, on the turns this worker takes."""

    def __init__(self, client: redis.Redis, keys: Keys, *, every: float, worker: str = "",
                 sweeps: Sequence[Callable[[], int]] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.keys = keys
        self.every = every
        self.worker = worker
        self.sweeps = tuple(sweeps)
        self._clock = clock
        self._next = 0.0

    def maybe_run(self) -> int:
        """Reap if this worker's period came and it won the pool's turn; how many jobs moved."""
        if self._clock() < self._next:
            return 0
        self._next = self._clock() + self.every
        try:
            # The turn lapses a little before the next period, so a lone worker never misses one.
            if not self.redis.set(self.keys.reaper_turn(), self.worker or "-", nx=True,
                                  px=max(1, int(self.every * 900))):
                return 0
            moved = self.run()
        except redis.RedisError as exc:
            log.warning("could not look for orphaned queues: %s", exc)
            return 0
        for sweep in self.sweeps:
            try:
                moved += sweep()
            except redis.RedisError as exc:
                log.warning("could not look for lost jobs: %s", exc)
        return moved

    def run(self) -> int:
        """Reap up to BATCH dead workers of this prefix; how many waiting messages moved.

        Each worker goes in one script (tasks/lua/registry_leave.lua), which checks that it
        is still dead (it may have come back meanwhile): one round trip per dead worker, none
        per message, none per live worker.
        """
        leave = script(self.redis, "registry_leave")
        seconds, micros = self.redis.time()  # the clock the deadlines were set by
        now_ms = seconds * 1000 + micros // 1000
        dead = cast(list[bytes], self.redis.zrangebyscore(
            self.keys.deadlines(), "-inf", now_ms, start=0, num=BATCH))
        moved = 0
        for name in (text(raw) for raw in dead):
            reply = cast(list[Any], leave(keys=[self.keys.worker(name), self.keys.worker_routes(name),
                                                self.keys.deadlines()], args=[name, "reap"]))
            for queue, target, count in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
                if count:
                    log.warning("worker %s is gone: moved %d waiting job(s) from %s to %s", name,
                                count, text(queue), text(target))
                moved += int(count)
        self.redis.zremrangebyscore(self.keys.tasks_offered(), "-inf",
                                    now_ms - int(TASKS_KEPT_SECONDS * 1000))
        return moved
