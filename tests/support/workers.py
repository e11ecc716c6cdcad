"""Real `modelq worker` subprocesses for end-to-end tests.

Each worker is a separate process started through the console script, as a user
starts it; tests can stop it (SIGTERM), kill it (SIGKILL) and read its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from tasks.state.keys import Keys


class WorkerProcess:
    """One `modelq worker` process and its log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, timeout: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


class WorkerPool:
    """Starts workers against one Redis with a shared environment; stops them all at the end."""

    def __init__(self, redis_url: str, log_dir: Path, env: dict[str, str] | None = None,
                 key_prefix: str = "modelq") -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.env = env or {}
        self.keys = Keys(key_prefix)
        self.workers: list[WorkerProcess] = []

    def start(self, name: str, *args: str, wait: bool = True, timeout: float = 90,
              env: dict[str, str] | None = None, cli_args: tuple[str, ...] = (),
              device: str = "cpu") -> WorkerProcess:
        """`modelq [cli_args] worker --device DEVICE --name NAME args`: cli_args are the
        group's (`-v`); a GPU worker pins itself to `device` (cuda:N)."""
        log = self.log_dir / f"worker-{name}-{len(self.workers)}.log"
        full_env = {**os.environ, "MODELQ_REDIS_URL": self.redis_url,
                    "MODELQ_HEARTBEAT_SECONDS": "0.5", "MODELQ_WORKER_TTL_SECONDS": "3",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", *cli_args, "worker", "--device", device,
                 "--name", name, *args],
                stdout=out, stderr=subprocess.STDOUT, env=full_env)
        worker = WorkerProcess(name, proc, log)
        self.workers.append(worker)
        if wait:
            self.wait_registered(worker, timeout)
        return worker

    def start_all(self, names: list[str], env: dict[str, str]) -> list[WorkerProcess]:
        """Start workers `names` at once, then wait for each to register."""
        workers = [self.start(name, env=env, wait=False) for name in names]
        for worker in workers:
            self.wait_registered(worker, timeout=180)
        return workers

    def supervise(self, live: list[WorkerProcess], env: dict[str, str], done: Callable[[], bool],
                  timeout: float, first: int) -> int:
        """Replace each worker of `live` that dies (w<first>, w<first+1>, ...), as a supervisor
        would, until `done()`; the deaths seen. AssertionError past `timeout` seconds."""
        deaths, n = 0, first
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"the crash loop did not stop ({deaths} deaths)"
            for worker in [w for w in live if not w.alive()]:
                deaths += 1
                live.remove(worker)
                live.append(self.start(f"w{n}", env=env, wait=False))
                n += 1
            time.sleep(0.2)
        return deaths

    def wait_registered(self, worker: WorkerProcess, timeout: float = 90) -> None:
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not worker.alive():
                raise RuntimeError(f"worker {worker.name} exited:\n{worker.log_text()[-3000:]}")
            ready = f"worker {worker.name} ready" in worker.log_text()
            if ready and client.exists(self.keys.worker(worker.name)):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {worker.name} did not register:\n{worker.log_text()[-3000:]}")

    def stop_all(self, timeout: float = 20) -> None:
        """SIGTERM every live worker at once, then wait for each (SIGKILL past `timeout`):
        their warm shutdowns overlap instead of queueing one behind another."""
        for worker in self.workers:
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()

    def __iter__(self) -> Iterator[WorkerProcess]:
        return iter(self.workers)
