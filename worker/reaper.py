"""Hands the waiting jobs of dead workers to the shared queue, so none waits for a worker that is gone.

Loads are routed to one worker's own queue; when that worker dies, the jobs queued
behind it, and the one it was running (put back by the broker after the visibility
timeout), would wait in a queue nobody consumes. Every live worker runs `maybe_run`
from its heartbeat: a worker's own queues whose registry entry has expired are moved,
oldest first, onto the matching shared queue (attach/unload jobs then fail cleanly as
ModelNotFound: their model died with the worker).

Queue names come from tasks/keys.py; this module never changes a job record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from tasks.keys import Keys, orphan_destination, queue_list, worker_queue_pattern

log = logging.getLogger(__name__)


class Reaper:
    """Moves orphaned worker queues to the shared queue, at most every `every` seconds."""

    def __init__(self, client: redis.Redis, keys: Keys, *, every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.keys = keys
        self.every = every
        self._clock = clock
        self._next = 0.0

    def maybe_run(self) -> int:
        if self._clock() < self._next:
            return 0
        self._next = self._clock() + self.every
        try:
            return self.run()
        except redis.RedisError as exc:
            log.warning("could not look for orphaned queues: %s", exc)
            return 0

    def run(self) -> int:
        """Move every waiting message of dead workers' queues; how many were moved."""
        moved = 0
        for raw in self.redis.scan_iter(match=worker_queue_pattern(), count=200, _type="LIST"):
            queue = raw.decode() if isinstance(raw, bytes) else str(raw)
            target = orphan_destination(queue)
            if target is None or self.redis.exists(self.keys.worker(target[0])):
                continue
            count = 0
            while self.redis.lmove(queue_list(queue), queue_list(target[1]), "RIGHT", "LEFT") is not None:
                count += 1
            if count:
                log.warning("worker %s is gone: moved %d waiting job(s) from %s to %s", target[0],
                            count, queue, target[1])
            moved += count
        return moved
