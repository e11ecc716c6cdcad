"""A real Redis Sentinel (``redis-server CONF --sentinel``) for tests, owned start to finish.

Owns the process, its port on 127.0.0.1 and its config file (a sentinel rewrites
it, so it lives in a folder of its own). It monitors one master by name; nothing
here knows modelq's key layout.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from tests.support.redis_server import RedisServerError, _free_port, find_redis_server

__all__ = ["SentinelServer"]


class SentinelServer:
    """One sentinel watching `master` at 127.0.0.1:`master_port`; quick to fail over (1 s down-after)."""

    def __init__(self, master_port: int, *, master: str = "mymaster", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000, startup_timeout: float = 10.0) -> None:
        self.master = master
        self.port = _free_port()
        self.startup_timeout = startup_timeout
        self.folder = Path(tempfile.mkdtemp(prefix="modelq-sentinel-"))
        self.config = self.folder / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"sentinel monitor {master} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
            f"sentinel failover-timeout {master} {failover_timeout_ms}\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """modelq's MODELQ_REDIS_URL for this sentinel (db 0)."""
        return f"sentinel://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.folder / "sentinel.log"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, decode_responses=True)

    def master_port(self) -> int | None:
        """The port the sentinel names as the master's now (None while it knows none)."""
        address = self.client().sentinel_get_master_addr_by_name(self.master)
        return int(address[1]) if address else None

    def wait_replicas(self, count: int, timeout: float = 30) -> None:
        """Until the sentinel has found `count` healthy replicas (it can fail over only then)."""
        def healthy() -> bool:
            replicas = self.client().sentinel_slaves(self.master)
            return sum(1 for r in replicas
                       if r.get("is_sdown") is False and r.get("master-link-status") == "ok") >= count

        self._wait(healthy, timeout, f"{count} replica(s) known to the sentinel")

    def wait_master(self, port: int, timeout: float = 30) -> None:
        """Until the sentinel's failover to 127.0.0.1:`port` has ended.

        `get-master-addr-by-name` names the promoted replica a moment before the failover
        ends; clients (redis-py, kombu) read SENTINEL MASTERS, which lags until then.
        """
        def promoted() -> bool:
            state = self.client().sentinel_master(self.master)
            return int(state["port"]) == port and "failover_in_progress" not in state["flags"]

        self._wait(promoted, timeout, f"the sentinel to promote port {port}")

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([find_redis_server(), str(self.config), "--sentinel"],
                                          cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(self._answers, self.startup_timeout, "the sentinel to answer PING")
        return self

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _answers(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise RedisServerError(f"sentinel exited before answering PING\n{self.log_tail()}")
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")
