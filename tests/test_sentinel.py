"""Redis Sentinel end to end: a worker and a Client on a sentinel:// URL, through a failover.

A master, its replica and one sentinel (quorum 1, 1 s down-after); one `modelq worker`
(every load paused a few seconds in `loading`) and one Client, both on
`sentinel://127.0.0.1:PORT/0`. A job runs to the end; a second is loading when the
master is killed (SIGKILL). Once the sentinel has promoted the replica, the first
record is still there, the second job ends on the same worker without a retry, and
a third job submitted after the failover completes there too: worker and Client
found the new master by themselves. This test owns its servers, not the session's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob, ModelRef, Stage
from tasks.app import create_app
from tasks.client import Client
from tasks.settings import Settings
from tests.support.fault_waits import wait_for, wait_stage
from tests.support.redis_server import RedisServer
from tests.support.sentinel import SentinelServer
from tests.support.workers import WorkerPool


@pytest.fixture
def watched() -> Iterator[tuple[RedisServer, RedisServer, SentinelServer]]:
    """A master, a replica of it and a sentinel that has found the replica."""
    with RedisServer() as master, \
            RedisServer(extra_args=["--replicaof", "127.0.0.1", str(master.port)]) as replica, \
            SentinelServer(master.port) as sentinel:
        sentinel.wait_replicas(1)
        yield master, replica, sentinel


def test_settings_read_celery_sentinel_urls() -> None:
    settings = Settings(redis_url="sentinel://:p%40ss@s1:26379;sentinel://s2/3", sentinel_master="jobs")
    target = settings.sentinel
    assert target is not None
    assert (target.nodes, target.master, target.db, target.password) == (
        (("s1", 26379), ("s2", 26379)), "jobs", 3, "p@ss")
    options = create_app(settings).conf.broker_transport_options
    assert options["master_name"] == "jobs" and "password" not in options["sentinel_kwargs"]
    assert Settings(redis_url="redis://h:6379/0").sentinel is None
    with pytest.raises(ValueError, match="is not a sentinel://host:port address") as error:
        Settings(redis_url="sentinel://:secret@s1:26379;redis://s2:6379")
    assert "secret" not in str(error.value)


@pytest.mark.e2e
def test_worker_and_client_follow_a_failover(watched: tuple[RedisServer, RedisServer, SentinelServer],
                                            tmp_path: Path, models: dict[str, Path]) -> None:
    master, replica, sentinel = watched
    client = Client(Settings(redis_url=sentinel.url, connect_timeout_seconds=2))
    pool = WorkerPool(sentinel.url, tmp_path, env={"MODELQ_TEST_STAGE_DELAY": "loading:3"})
    try:
        worker = pool.start("w1", wait=False)  # the pool's own wait reads a redis:// URL
        wait_for(lambda: "worker w1 ready" in worker.log_text() and client.workers(), 120,
                 "w1 to register through the sentinel")
        first = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(120)
        assert first.status is JobStatus.succeeded and first.worker == "w1", first.error

        in_flight = client.submit(LoadJob(model=ModelRef(path=str(models["qwen2"]))))
        wait_stage(client, in_flight.job_id, Stage.loading)
        assert master.client().wait(1, 10_000) == 1  # the replica holds everything written so far
        master.kill()
        sentinel.wait_master(replica.port, timeout=30)

        assert client.status(first.job_id).status is JobStatus.succeeded  # replicated, still readable
        record = in_flight.wait(120)
        assert record.status is JobStatus.succeeded and record.worker == "w1" and record.attempt == 1, \
            (record.error, worker.log_text()[-3000:])
        after = client.submit(LoadJob(model=ModelRef(path=str(models["mistral"])))).wait(120)
        assert after.status is JobStatus.succeeded and after.worker == "w1", \
            (after.error, worker.log_text()[-3000:])
        assert worker.alive() and [w.name for w in client.workers()] == ["w1"]
        assert replica.client().exists(client.keys.job(after.job_id))  # written on the new master
    finally:
        pool.stop_all()
