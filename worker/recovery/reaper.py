"""Hands the jobs of dead workers to live ones, so none waits for a worker that is gone.

Loads are routed to one worker's own queue; when that worker dies, the jobs queued
behind it would wait in a queue nobody consumes. Every live worker bids once a period
from its heartbeat (inside the beat's own script: `bid_ms`, `take`); one of them per period
takes the turn (`Keys.reaper_turn`, SET NX with a TTL) and reaps its prefix's dead workers:
those whose deadline passed (`Keys.deadlines`, a sorted set: no scan of the registry or the
keyspace). One script per dead worker removes its routing index entries and moves each of
its own queues (its memo lists them, tenant shares included), oldest first, onto the
matching shared queue (attach/unload jobs then fail cleanly as ModelNotFound: their model
died with the worker); then the turn runs the sweeps it was given
(worker/recovery/rescue.py: the message of a job its dead worker was running, put back within
a worker TTL or two instead of the broker's visibility timeout; a queued job whose
message was lost, sent again).

Queue names come from tasks/state/keys.py; this module never changes a job record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis

from tasks.state.connection import text
from tasks.state.keys import Keys
from tasks.state.scripts import script

log = logging.getLogger(__name__)

BATCH = 100
"""Dead workers one turn reaps, longest dead first; the rest wait for the next turn."""

WATCH_BATCH = 1000
"""Reaped workers whose queues one turn looks at again, the soonest forgotten first."""

TASKS_KEPT_SECONDS = 86400.0
"""How long a task no live worker offers any more stays in `Keys.tasks_offered`."""


def reap_every(worker_ttl: float) -> float:
    """Seconds between reaper turns: half a worker TTL, so a dead worker's queued jobs are
    on the shared queue within 1.5 TTLs of its last beat (its deadline, then a turn)."""
    return worker_ttl / 2


class Reaper:
    """Reaps dead workers (their queues moved to the shared ones, their index entries removed)
    and runs the rescue sweeps, at most every `every` seconds, on the turns this worker takes.

    A reaped worker's own queues are watched for `watch` seconds more (the broker's visibility
    timeout and a little: a message it puts back late lands on them), then forgotten.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, every: float, worker: str = "",
                 sweeps: Sequence[Callable[[], int]] = (), watch: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.keys = keys
        self.every = every
        self.worker = worker
        self.sweeps = tuple(sweeps)
        self.watch_ms = int(max(watch, every) * 1000)
        self._clock = clock
        self._next = 0.0

    def bid_ms(self) -> int:
        """The turn's TTL (ms) to bid with if this worker's period came, else 0; a bid starts
        the next period. The heartbeat bids inside its beat script (worker/recovery/heartbeat.py):
        every live worker bids once a period, so a bid of its own would be a pool-wide round
        trip per period and worker. The turn lapses a little before the next period, so a
        lone worker never misses one."""
        if self._clock() < self._next:
            return 0
        self._next = self._clock() + self.every
        return max(1, int(self.every * 900))

    def maybe_run(self) -> int:
        """Bid for the pool's turn if this worker's period came, and take it if won; how many
        jobs moved (the bid on its own, for a beat that could not carry it)."""
        ttl_ms = self.bid_ms()
        if not ttl_ms:
            return 0
        try:
            if not self.redis.set(self.keys.reaper_turn(), self.worker or "-", nx=True, px=ttl_ms):
                return 0
        except redis.RedisError as exc:
            log.warning("could not look for orphaned queues: %s", exc)
            return 0
        return self.take()

    def take(self) -> int:
        """The turn this worker won: reap, then run the sweeps; how many jobs moved."""
        try:
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
        """Reap up to BATCH dead workers of this prefix, then look again at the queues of those
        reaped before; how many waiting messages moved.

        Each dead worker goes in one script (tasks/state/lua/registry_leave.lua), which checks that
        it is still dead (it may have come back meanwhile); the second look is one script
        (tasks/state/lua/registry_watch.lua). No round trip per message, none per live worker.
        """
        leave = script(self.redis, "registry_leave")
        seconds, micros = self.redis.time()  # the clock the deadlines were set by
        now_ms = seconds * 1000 + micros // 1000
        dead = cast(list[bytes], self.redis.zrangebyscore(
            self.keys.deadlines(), "-inf", now_ms, start=0, num=BATCH))
        moved = 0
        for name in (text(raw) for raw in dead):
            reply = cast(list[Any], leave(
                keys=[self.keys.worker(name), self.keys.worker_routes(name), self.keys.deadlines(),
                      self.keys.reaped()], args=[name, "reap", self.watch_ms]))
            for queue, target, count in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
                moved += self._moved(name, text(queue), text(target), int(count))
        self.redis.zremrangebyscore(self.keys.tasks_offered(), "-inf",
                                    now_ms - int(TASKS_KEPT_SECONDS * 1000))
        return moved + self._watch()

    def _watch(self) -> int:
        names = [text(raw) for raw in cast(list[bytes], self.redis.zrange(
            self.keys.reaped(), 0, WATCH_BATCH - 1))]
        if not names:
            return 0
        reply = cast(list[Any], script(self.redis, "registry_watch")(
            keys=[self.keys.deadlines(), self.keys.reaped(),
                  *(self.keys.worker_routes(name) for name in names)], args=names))
        return sum(self._moved(text(name), text(queue), text(target), int(count))
                   for name, queue, target, count
                   in zip(reply[::4], reply[1::4], reply[2::4], reply[3::4], strict=True))

    @staticmethod
    def _moved(name: str, queue: str, target: str, count: int) -> int:
        if count:
            log.warning("worker %s is gone: moved %d waiting job(s) from %s to %s", name, count,
                        queue, target)
        return count
