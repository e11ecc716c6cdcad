"""The worker's registry entry: written at start, refreshed by a heartbeat, removed at exit.

The entry has a TTL, so a worker that dies without cleaning up vanishes within it.
Each beat also runs `on_beat` (the worker's job leases, worker/lease.py), so a lease
lives exactly as long as the heartbeat does.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from schemas import ResidentModel, WorkerInfo
from tasks.keys import Keys

log = logging.getLogger(__name__)


_TIMES: Any = {"heartbeat_at": True, "models": {"__all__": {"last_used"}}}


@dataclass(frozen=True)
class WorkerState:
    """What the entry says of the worker's cache right now."""

    capacity: int
    free: int
    models: list[ResidentModel]
    tasks: tuple[str, ...] = ()


class WorkerNameTaken(RuntimeError):
    """A live worker already holds this name."""


class Heartbeat:
    """Publishes this worker's WorkerInfo every `interval` seconds with a `ttl`."""

    def __init__(self, client: redis.Redis, keys: Keys, worker: tuple[str, str], *,
                 state: Callable[[], WorkerState], timing: tuple[float, float],
                 on_beat: Callable[[], None] = lambda: None,
                 on_reconnect: Callable[[], None] = lambda: None) -> None:
        self.redis = client
        self.keys = keys
        self.name, self.device = worker  # the worker's name and its device as configured
        self._state = state
        self._on_beat = on_beat  # leases renewed, dead workers' queues rescued
        self._on_reconnect = on_reconnect  # called once Redis answers again after an outage
        self._failing = False
        self.interval, ttl = timing  # (seconds between beats, seconds the entry lives)
        self.ttl_ms = int(ttl * 1000)
        self.started_at = datetime.now(UTC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._published: str | None = None  # the entry last written, less its times

    def info(self) -> WorkerInfo:
        state = self._state()
        return WorkerInfo(name=self.name, host=socket.gethostname(), pid=os.getpid(),
                          device=self.device, queue=self.keys.worker_queue(self.name),
                          capacity_bytes=state.capacity, free_bytes=state.free,
                          models=tuple(state.models), tasks=state.tasks, started_at=self.started_at,
                          heartbeat_at=datetime.now(UTC))

    def register(self) -> None:
        """Claim the name; WorkerNameTaken if another live process holds it."""
        info = self.info()
        if not self.redis.set(self.keys.worker(self.name), info.model_dump_json(), nx=True,
                              px=self.ttl_ms):
            raw = self.redis.get(self.keys.worker(self.name))
            other = WorkerInfo.model_validate_json(raw) if raw else None
            if other is not None and (other.host, other.pid) != (info.host, info.pid):
                raise WorkerNameTaken(
                    f"a live worker named {self.name!r} runs on {other.host} (pid {other.pid}); "
                    "stop it or start this one with another --name")
        self.redis.sadd(self.keys.workers(), self.name)
        self.publish()

    def publish(self, force: bool = True) -> None:
        """Write the entry now; with `force` False only if what it says changed (not its times).

        The heartbeat always writes (the TTL); after a job, a cache hit changes nothing a
        router reads, so it costs no round trip.
        """
        with self._lock:
            info = self.info()
            content = info.model_dump_json(exclude=_TIMES)
            if not force and content == self._published:
                return
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.set(self.keys.worker(self.name), info.model_dump_json(), px=self.ttl_ms)
                pipe.sadd(self.keys.workers(), self.name)
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("worker %s: heartbeat failed: %s", self.name, exc)
                self._failing = True
                return
            self._published = content
            recovered, self._failing = self._failing, False
        if recovered:
            log.warning("worker %s: Redis answers again", self.name)
            self._on_reconnect()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="modelq-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and leave the registry."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
        try:
            self.redis.delete(self.keys.worker(self.name))
            self.redis.srem(self.keys.workers(), self.name)
        except redis.RedisError as exc:
            log.warning("worker %s: could not leave the registry: %s", self.name, exc)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish()
            try:
                self._on_beat()
            except Exception:  # a beat must never die
                log.exception("worker %s: lease renewal failed", self.name)
