"""Job leases: which live worker process is running a job, so no delivery starts it twice.

A lease is a Redis string with a TTL holding 'worker:pid'. The worker takes it
with SET NX before running a job (in the same script that marks the job
running, tasks/state/store.py Store.start), its heartbeat thread renews it, and it is
deleted with the job's final record. A lease therefore stays live exactly as long as its
holder's heartbeat does: after a `kill -9` it lapses within the TTL and the next
delivery of the job takes over (counted as a new attempt).

This module owns lease tokens and their renewal; it never changes a job record
and never talks to the broker.
"""

from __future__ import annotations

import logging
import os
import threading

import redis

from tasks.state.keys import Keys
from tasks.state.scripts import script

log = logging.getLogger(__name__)



class Leases:
    """The leases this worker process holds, taken, renewed and released against Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, *, worker: str, ttl: float) -> None:
        self.redis = client
        self.keys = keys
        self.token = f"{worker}:{os.getpid()}"
        self.ttl_ms = max(1000, int(ttl * 1000))
        self._held: set[str] = set()
        self._renew = script(client, "lease_renew")  # only the holder renews or drops its lease
        self._release = script(client, "release")
        self._lock = threading.Lock()

    def lease(self, job_id: str) -> tuple[str, str, int]:
        """(key, token, ttl ms) of this process's lease on `job_id`, for the script that takes
        it with the job's start (tasks/state/store.py Store.start: SET NX, then the record)."""
        return self.keys.lease(job_id), self.token, self.ttl_ms

    def hold(self, job_id: str) -> None:
        """Renew `job_id`'s lease from now on: this process took it."""
        with self._lock:
            self._held.add(job_id)

    def pair(self, job_id: str) -> tuple[str, str]:
        """(key, token) of this process's lease on `job_id`: what a compare-and-delete drops."""
        return self.keys.lease(job_id), self.token

    def forget(self, job_id: str) -> None:
        """Stop renewing `job_id`: its lease was deleted with the job's final record."""
        with self._lock:
            self._held.discard(job_id)

    def release(self, job_id: str) -> None:
        self.forget(job_id)
        try:
            self._release(keys=[self.keys.lease(job_id)], args=[self.token])
        except redis.RedisError as exc:  # it lapses by itself within the TTL
            log.warning("job %s: could not release its lease: %s", job_id, exc)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def renew(self) -> None:
        """Extend every held lease (called by the heartbeat thread)."""
        for job_id in self.held():
            try:
                if not self._renew(keys=[self.keys.lease(job_id)], args=[self.token, self.ttl_ms]):
                    # Lapsed (Redis restarted, or a stall longer than the TTL): take it back
                    # unless another worker took over the job meanwhile.
                    if not self.redis.set(self.keys.lease(job_id), self.token, nx=True, px=self.ttl_ms):
                        log.error("job %s: lease lost to %s", job_id, self.redis.get(self.keys.lease(job_id)))
            except redis.RedisError as exc:
                log.warning("job %s: lease renewal failed: %s", job_id, exc)
