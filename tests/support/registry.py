"""A pool of workers as their heartbeats publish them into the registry: real Heartbeat
objects over stub states, no threads, no worker processes (routing and scale tests)."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from schemas import LoadJob, ResidentModel
from tasks.state.keys import Keys
from tasks.state.registry import request_key
from worker.recovery.heartbeat import Heartbeat, WorkerState

NOW = datetime.now(UTC)
KEY = "ab" * 16
"""The model key `resident` gives."""


def resident(job: LoadJob, tenant: str = "default") -> ResidentModel:
    """A resident model (key KEY) that serves `job`'s loads."""
    return ResidentModel(model_key=KEY, base="/m", tenant=tenant, bytes=10, last_used=NOW,
                         request_keys=(request_key(job),))


class Pool:
    """Workers as their heartbeats publish them, with stub states and no threads."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None) -> None:
        self.redis = client
        self.keys = keys or Keys()
        self.states: dict[str, WorkerState] = {}
        self.beats: dict[str, Heartbeat] = {}

    def add(self, name: str, free: int, models: tuple[ResidentModel, ...] = (),
            tasks: tuple[str, ...] = (), ttl: float = 30) -> Heartbeat:
        self.states[name] = WorkerState(100, free, list(models), tasks)
        beat = self.beats[name] = Heartbeat(self.redis, self.keys, (name, "cpu"),
                                            state=lambda: self.states[name], timing=(1, ttl))
        beat.publish()
        return beat

    def change(self, name: str, free: int, models: tuple[ResidentModel, ...] = ()) -> None:
        self.states[name] = WorkerState(100, free, list(models), self.states[name].tasks)
        self.beats[name].publish(force=False)

    def kill(self, name: str) -> None:
        """The worker died: its entry expired and its deadline passed (nothing reaped)."""
        self.redis.delete(self.keys.worker(name))
        self.redis.zadd(self.keys.deadlines(), {name: 1})

