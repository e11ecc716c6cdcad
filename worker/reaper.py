"""Hands the jobs of dead workers to live ones, so none waits for a worker that is gone.

Loads are routed to one worker's own queue; when that worker dies, the jobs queued
behind it would wait in a queue nobody consumes. Every live worker runs `maybe_run`
from its heartbeat; one of them per period takes the turn (`Keys.reaper_turn`, SET NX
with a TTL) and moves the own queues of its prefix's workers whose registry entry has
expired, oldest first and one script per queue, onto the matching shared queue
(attach/unload jobs then fail cleanly as ModelNotFound: their model died with the
worker), then runs the sweeps it was given
(worker/rescue.py: the message of a job its dead worker was running, put back within
a worker TTL or two instead of the broker's visibility timeout; a queued job whose
message was lost, sent again).

Queue names come from tasks/keys.py; this module never changes a job record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import redis

from tasks.keys import Keys, queue_list
from tasks.scripts import script

log = logging.getLogger(__name__)


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
        """Move every waiting message of this prefix's dead workers' queues; how many moved.

        Each queue moves in one script (tasks/lua/queue_drain.lua), which checks the worker
        is still gone: one round trip per queue, none per message.
        """
        moved = 0
        drain = script(self.redis, "queue_drain")
        for raw in self.redis.scan_iter(match=self.keys.worker_queue_pattern(), count=200,
                                        _type="LIST"):
            queue = raw.decode() if isinstance(raw, bytes) else str(raw)
            target = self.keys.orphan_destination(queue)
            if target is None or self.redis.exists(self.keys.worker(target[0])):
                continue
            count = int(drain(keys=[queue_list(queue), queue_list(target[1]),
                                    self.keys.worker(target[0])]))
            if count:
                log.warning("worker %s is gone: moved %d waiting job(s) from %s to %s", target[0],
                            count, queue, target[1])
            moved += count
        return moved
