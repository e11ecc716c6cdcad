"""`modelq up`: one machine's whole pool in one command (no torch here).

Starts the embedded Redis (unless MODELQ_REDIS_URL names one) and one `modelq worker`
subprocess per visible GPU, or one CPU worker; publishes where it runs in
`<home>/up.json` so other commands find it; on SIGINT/SIGTERM stops the workers
(warm shutdown), then Redis, and removes the file. GPUs are counted without torch:
CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from tasks.embedded import EmbeddedRedis, UpState, read_state, remove_state, write_state
from tasks.settings import Settings

log = logging.getLogger(__name__)


def visible_gpus() -> int:
    """How many GPUs this machine shows, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return 0 if not ids or ids[0].startswith("-") else len(ids)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def default_devices() -> list[str]:
    count = visible_gpus()
    return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]


class Up:
    """The embedded Redis and the worker subprocesses of one `modelq up`."""

    def __init__(self, settings: Settings, devices: list[str] | None = None,
                 worker_args: tuple[str, ...] = (), log_dir: Path | None = None,
                 metrics_port: int | None = None) -> None:
        self.settings = settings
        self.metrics_port = metrics_port
        self.devices = devices or default_devices()
        self.worker_args = worker_args
        self.log_dir = log_dir
        self.redis: EmbeddedRedis | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()

    @property
    def redis_url(self) -> str:
        return self.redis.url if self.redis is not None else self.settings.redis_url

    def start(self) -> None:
        other = read_state(self.settings.home)
        if other is not None:
            raise RuntimeError(f"`modelq up` already runs (pid {other.pid}) for {self.settings.home}; "
                               "stop it first, or use it: other commands find it by themselves")
        if not self.settings.redis_configured:
            self.redis = EmbeddedRedis(self.settings.home / "redis").start()
        host = socket.gethostname()
        for i, device in enumerate(self.devices):
            name = f"{host}-{device.replace(':', '')}"
            args = self.worker_args
            if self.metrics_port is not None:
                args = (*args, "--metrics-port", str(self.metrics_port + i))
            self.workers[name] = self._spawn(device, name, args)
        write_state(self.settings.home, UpState(
            redis_url=self.redis_url, pid=os.getpid(), redis_pid=self.redis.pid if self.redis else None,
            workers=tuple(p.pid for p in self.workers.values())))
        log.info("modelq up: %d worker(s) on %s, Redis %s", len(self.workers), ", ".join(self.devices),
                 "embedded" if self.redis else "from MODELQ_REDIS_URL")

    def _spawn(self, device: str, name: str, args: tuple[str, ...]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "MODELQ_REDIS_URL": self.redis_url, "MODELQ_HOME": str(self.settings.home)}
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"worker-{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            # A session of its own: Ctrl-C reaches `up` only, which stops workers in order.
            flags = ["--log-json"] if self.settings.log_json else []
            return subprocess.Popen([sys.executable, "-m", "tasks.cli", *flags, "worker", "--device", device,
                                     "--name", name, *args],
                                    env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True)
        finally:
            if out is not None:
                out.close()

    def wait(self) -> int:
        """Run until a signal or a worker exits; 0 when stopped by a signal."""
        while not self._stop.wait(0.5):
            for name, proc in self.workers.items():
                if proc.poll() is not None:
                    log.error("worker %s exited with %s; stopping modelq up", name, proc.returncode)
                    return 1
        return 0

    def request_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        self._stop.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Warm-stop the workers (they finish their job), then Redis; remove up.json."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.workers.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0fs; killing it", name, timeout)
                proc.kill()
                proc.wait(10)
        if self.redis is not None:
            self.redis.stop()
        remove_state(self.settings.home, os.getpid())


def run_up(settings: Settings, devices: list[str] | None = None,
           worker_args: tuple[str, ...] = (), metrics_port: int | None = None) -> int:
    """`modelq up` in the foreground; returns the exit code."""
    up = Up(settings, devices, worker_args, metrics_port=metrics_port)
    previous = {sig: signal.signal(sig, up.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        up.start()
        print(f"modelq up: {len(up.workers)} worker(s) on {', '.join(up.devices)}; "
              f"Redis on {up.redis_url.rsplit('@', 1)[-1]}. Ctrl-C stops everything.", flush=True)
        return up.wait()
    finally:
        up.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("modelq up: stopped", flush=True)
