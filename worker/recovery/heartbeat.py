"""The worker's registry entry: written at start, kept alive by a heartbeat, removed at exit.

The entry has a TTL, so a worker that dies without cleaning up vanishes within it. A beat
renews that TTL and the worker's deadline (`Keys.deadlines`) in one small script, whatever
the pool's size, and carries the worker's bid for the pool's reaper turn (worker/recovery/reaper.py);
the entry and the routing index entries it implies (tasks/state/index.py) are written again only
when what it says changes, or when it vanished. Each beat also runs `on_beat` (the worker's
job leases, worker/jobs/lease.py), so a lease lives exactly as long as the heartbeat does.
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
from tasks.state.index import memo_json
from tasks.state.keys import Keys
from tasks.state.scripts import script
from worker.recovery.reaper import Reaper

log = logging.getLogger(__name__)


_TIMES: Any = {"heartbeat_at": True, "models": {"__all__": {"last_used"}}}


@dataclass(frozen=True)
class WorkerState:
    """What the entry says of the worker's cache right now."""

    capacity: int
    free: int
    models: list[ResidentModel]
    tasks: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()  # every queue it consumes: its own tenant shares are drained
    # to the shared ones when it dies (its own queue always is)


class WorkerNameTaken(RuntimeError):
    """A live worker already holds this name."""


class Heartbeat:
    """Keeps this worker's WorkerInfo alive every `interval` seconds with a `ttl`."""

    def __init__(self, client: redis.Redis, keys: Keys, worker: tuple[str, str], *,
                 state: Callable[[], WorkerState], timing: tuple[float, float],
                 on_beat: Callable[[], None] = lambda: None,
                 on_reconnect: Callable[[], None] = lambda: None) -> None:
        self.redis = client
        self.keys = keys
        self.name, self.device = worker  # the worker's name and its device as configured
        self._state = state
        self._on_beat = on_beat  # leases renewed, tenant turns swept
        self.reaper: Reaper | None = None  # set by the owner: its bids ride on the beat script
        self._on_reconnect = on_reconnect  # called once Redis answers again after an outage
        self._failing = False
        self.interval, ttl = timing  # (seconds between beats, seconds the entry lives)
        self.ttl_ms = int(ttl * 1000)
        self.started_at = datetime.now(UTC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._published: str | None = None  # the entry last written, less its times
        self._beat_args: list[Any] = []  # the beat script's ARGV: name, TTL, bid, the tasks
        self._beat_keys = [keys.worker(self.name), keys.deadlines(), keys.tasks_offered(),
                           keys.reaper_turn()]
        self._state_written: WorkerState | None = None  # the state the entry last said
        self._scripts = {name: script(client, f"registry_{name}")
                         for name in ("publish", "beat", "leave")}

    def info(self) -> WorkerInfo:
        return self._info(self._state())

    def _info(self, state: WorkerState) -> WorkerInfo:
        return WorkerInfo(name=self.name, host=socket.gethostname(), pid=os.getpid(),
                          device=self.device, queue=self.keys.worker_queue(self.name),
                          capacity_bytes=state.capacity, free_bytes=state.free,
                          models=tuple(state.models), tasks=state.tasks, started_at=self.started_at,
                          heartbeat_at=datetime.now(UTC), ttl_seconds=self.ttl_ms / 1000)

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
        self.publish()

    def publish(self, force: bool = True) -> None:
        """Write the entry and its routing index entries now; with `force` False only if what
        it says changed (not its times): after a job, a cache hit changes nothing a router
        reads, so it costs no round trip."""
        with self._lock:
            state = self._state()
            info = self._info(state)
            content = info.model_dump_json(exclude=_TIMES)
            if not force and content == self._published:
                return
            recovered = self._guarded(lambda: self._write(info, content, state))
        self._recovered(recovered)

    def beat(self) -> None:
        """One beat, what the thread does each interval: renew the entry's TTL and the
        deadlines and bid for the reaper's turn (one script), publishing in full instead when
        what the entry says changed or it vanished; then the reaper's turn if won (a beat
        that published bids on its own), then `on_beat`."""
        won: list[bool] = []  # [whether the beat script won the turn], empty if it did not run
        with self._lock:
            state = self._state()
            recovered = self._guarded(lambda: self._renew(state, won))
        self._recovered(recovered)
        try:
            if self.reaper is not None and won == [True]:
                self.reaper.take()
            elif self.reaper is not None and not won:  # it published instead: bid on its own
                self.reaper.maybe_run()
            self._on_beat()
        except Exception:  # a beat must never die
            log.exception("worker %s: lease renewal or reaping failed", self.name)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="modelq-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and leave the registry: the entry and index entries go in one script;
        the reaper's next turn drains whatever still waits on this worker's own queues."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
        try:
            self._scripts["leave"](keys=[*self._own_keys(), self.keys.reaped()],
                                   args=[self.name, "leave"])
        except redis.RedisError as exc:
            log.warning("worker %s: could not leave the registry: %s", self.name, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def _own_keys(self) -> list[str]:
        return [self.keys.worker(self.name), self.keys.worker_routes(self.name),
                self.keys.deadlines()]

    def _renew(self, state: WorkerState, won: list[bool]) -> None:
        """Renew the entry; publish in full if what it says changed or it vanished. A state
        equal to the one last written is not even serialized: a beat of an idle worker
        costs one small script, its keys and arguments built once, and no JSON."""
        if state != self._state_written:
            info = self._info(state)
            content = info.model_dump_json(exclude=_TIMES)
            if content != self._published:
                self._write(info, content, state)
                return
            self._state_written = state  # only times changed (a cache hit's last_used)
        args = self._beat_args
        args[2] = self.reaper.bid_ms() if self.reaper is not None else 0
        deadline, turn = self._scripts["beat"](keys=self._beat_keys, args=args)
        won.append(bool(turn))
        if not deadline:
            info = self._info(state)  # the entry vanished: publish in full
            self._write(info, info.model_dump_json(exclude=_TIMES), state)

    def _write(self, info: WorkerInfo, content: str, state: WorkerState) -> None:
        self._scripts["publish"](
            keys=[*self._own_keys(), self.keys.tasks_offered()],
            args=[self.name, info.model_dump_json(), self.ttl_ms,
                  memo_json(self.keys, info, state.queues), info.free_bytes])
        self._published, self._state_written = content, state
        self._beat_args = [self.name, self.ttl_ms, 0, *info.tasks]

    def _guarded(self, write: Callable[[], None]) -> bool:
        """Run `write` (a Redis error is logged); whether it is the first success after one."""
        try:
            write()
        except redis.RedisError as exc:
            log.warning("worker %s: heartbeat failed: %s", self.name, exc)
            self._failing = True
            return False
        recovered, self._failing = self._failing, False
        return recovered

    def _recovered(self, recovered: bool) -> None:
        if recovered:  # outside the lock: the Celery binding reconnects its consumer here
            log.warning("worker %s: Redis answers again", self.name)
            self._on_reconnect()
