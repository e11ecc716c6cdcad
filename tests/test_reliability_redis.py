"""Redis faults end to end: a killed and restarted Redis (AOF on) and an unreachable one.

Queued jobs survive a `kill -9` of Redis and complete; a running worker and an existing
Client reconnect by themselves; `submit` against a dead Redis fails fast with BrokerUnavailable.
This test owns its redis-server (append-only, fsync always) instead of the session one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import BrokerUnavailable, JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tasks.settings import Settings
from tests.support.fault_waits import wait_for
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="always", data_dir=tmp_path / "redis") as server:
        yield server


def test_redis_killed_and_restarted_loses_nothing(aof_redis: RedisServer, tmp_path: Path,
                                                  models: dict[str, Path]) -> None:
    client = Client(Settings(redis_url=aof_redis.url, connect_timeout_seconds=2))
    pool = WorkerPool(aof_redis.url, tmp_path)
    try:
        first = pool.start("w1")
        assert client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(120).status \
            is JobStatus.succeeded

        # Redis dies: submit fails fast and clearly, the worker rides it out.
        aof_redis.kill()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="unreachable.*nothing was enqueued"):
            client.submit(LoadJob(model=ModelRef(path=str(models["qwen2"]))))
        assert time.monotonic() - started < 10
        wait_for(lambda: "heartbeat failed" in first.log_text(), 30, "the worker to notice")
        assert first.alive()

        # Redis is back: the same worker and the same Client carry on by themselves.
        aof_redis.start()
        wait_for(lambda: [w for w in client.workers() if w.name == "w1"], 60, "w1 to re-register")
        record = client.submit(LoadJob(model=ModelRef(path=str(models["qwen2"])))).wait(120)
        assert record.status is JobStatus.succeeded and record.worker == "w1", record.error

        # Jobs queued with no worker survive a kill -9 of Redis and complete afterwards.
        assert first.terminate() == 0
        queued = [client.submit(LoadJob(model=ModelRef(path=str(models[m])), dtype="bfloat16"))
                  for m in ("llama", "qwen2", "mistral")]
        aof_redis.kill()
        aof_redis.start()
        assert all(h.status().status is JobStatus.queued for h in queued)
        pool.start("w2")
        for handle in queued:
            record = handle.wait(120)
            assert record.status is JobStatus.succeeded and record.attempt == 1, record.error
    finally:
        pool.stop_all()
