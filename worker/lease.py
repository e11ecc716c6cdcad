"""Job leases: which live worker process is running a job, so no delivery starts it twice.

A lease is a Redis string with a TTL holding 'worker:pid'. The worker takes it
with SET NX before running a job, its heartbeat thread renews it, and it is
deleted when the job ends. A lease therefore stays live exactly as long as its
holder's heartbeat does: after a `kill -9` it lapses within the TTL and the next
delivery of the job takes over (counted as a new attempt).

This module owns lease tokens and their renewal; it never changes a job record
(that is tasks/store.py) and never talks to the broker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import redis

from tasks.keys import Keys

log = logging.getLogger(__name__)

# Compare-and-set scripts: only the holder may renew or drop its lease.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
# Take a lease (SET NX) and read more keys: KEYS lease, then the others; ARGV token, ttl ms.
# Returns {taken, holder, then the others' values ('' when missing)}.
_ACQUIRE = """
local out = {redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0}
for i = 1, #KEYS do out[i + 1] = redis.call('GET', KEYS[i]) or '' end
return out
"""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Leases:
    """The leases this worker process holds, taken, renewed and released against Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, *, worker: str, ttl: float) -> None:
        self.redis = client
        self.keys = keys
        self.token = f"{worker}:{os.getpid()}"
        self.ttl_ms = max(1000, int(ttl * 1000))
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, job_id: str, *, read: Sequence[str]) -> tuple[str | None, list[bytes | None]]:
        """Take the lease on `job_id` and read the keys `read` at the same moment (one round trip).

        Returns (holder, their values): holder None when the lease is now ours, else the
        token of the live worker that holds it.
        """
        key = self.keys.lease(job_id)
        taken, holder, *values = self._acquire(keys=[key, *read], args=[self.token, self.ttl_ms])
        found = [value or None for value in values]
        text = holder.decode() if isinstance(holder, bytes) else str(holder)
        if taken or text == self.token:  # ours (a retried acquire finds its own token)
            with self._lock:
                self._held.add(job_id)
            return None, found
        return text, found

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
            self.redis.eval(_RELEASE, 1, self.keys.lease(job_id), self.token)
        except redis.RedisError as exc:  # it lapses by itself within the TTL
            log.warning("job %s: could not release its lease: %s", job_id, exc)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def renew(self) -> None:
        """Extend every held lease (called by the heartbeat thread)."""
        for job_id in self.held():
            try:
                if not self.redis.eval(_RENEW, 1, self.keys.lease(job_id), self.token, self.ttl_ms):
                    # Lapsed (Redis restarted, or a stall longer than the TTL): take it back
                    # unless another worker took over the job meanwhile.
                    if not self.redis.set(self.keys.lease(job_id), self.token, nx=True, px=self.ttl_ms):
                        log.error("job %s: lease lost to %s", job_id, self.redis.get(self.keys.lease(job_id)))
            except redis.RedisError as exc:
                log.warning("job %s: lease renewal failed: %s", job_id, exc)
