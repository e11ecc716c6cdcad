"""A Redis that accepts connections but never answers: commands fail within the command
timeout (default 10 s) instead of hanging, while reads that block on purpose are not cut short.

Everything here runs on the default timeouts: they are what makes it quick.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import JobStatus
from tasks.client import Client
from tasks.settings import Settings
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """redis:// URL of a TCP server on 127.0.0.1 that accepts every connection, never replies."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    server.close()
    for conn in held:
        conn.close()


def test_modelq_load_against_a_silent_redis_exits_4_within_12s(silent_redis: str,
                                                                tmp_path: Path) -> None:
    env = {**os.environ, "MODELQ_REDIS_URL": silent_redis}
    env = {k: v for k, v in env.items() if not k.startswith("MODELQ_") or k == "MODELQ_REDIS_URL"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "load", str(tmp_path), "--wait"],
                          capture_output=True, text=True, env=env, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 4, done.stderr
    assert "did not answer within 10s" in done.stderr and "nothing was enqueued" in done.stderr
    assert took < 13, f"took {took:.1f}s (the interpreter's start included)"


def test_a_block_longer_than_the_command_timeout_is_not_cut_short(redis_url: str) -> None:
    client = Client(Settings(redis_url=redis_url))  # defaults: a 10 s command timeout
    started = time.monotonic()
    assert client.store.events("no-such-job", after="$", block_ms=15_000) == []  # the gateway's
    assert time.monotonic() - started >= 14.5


def test_wait_on_a_20s_job_is_not_cut_short(redis_url: str, pool: WorkerPool,
                                            models: dict[str, Path]) -> None:
    pool.start("w1", env={"MODELQ_TEST_STAGE_DELAY": "loading:20"})
    env = {**os.environ, "MODELQ_REDIS_URL": redis_url}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "load", str(models["llama"]),
                           "--wait", "--json"], capture_output=True, text=True, env=env,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 20
    assert JobStatus.succeeded.value in done.stdout
