"""Two deployments on one Redis, told apart by MODELQ_KEY_PREFIX: queues included.

A worker killed in one pool has its own queue moved by that pool's reaper only; the other
pool's queues, registry and jobs (its worker even has the same name) are left alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob, ModelRef, Stage
from tasks.client import Client
from tasks.keys import Keys
from tasks.settings import Settings
from tests.support.faults import wait_for, wait_stage
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e


def test_default_prefix_keeps_todays_queue_names() -> None:
    keys = Keys()
    assert keys.queue() == "modelq" and keys.worker_queue("w1") == "modelq.worker.w1"
    assert keys.tenant_queues("t", 2) == ["modelq.tenant.t", "modelq.tenant.t.1"]
    assert keys.orphan_destination("modelq.worker.w1.tenant.t.1") == ("w1", "modelq.tenant.t.1")
    assert keys.orphan_destination("teamb.worker.w1") is None
    other = Keys("team*b")
    assert other.worker_queue("w") == "team*b.worker.w"


def test_two_prefixes_share_one_redis(client: Client, redis_url: str, tmp_path: Path,
                                      pool: WorkerPool, models: dict[str, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    other = WorkerPool(redis_url, tmp_path / "b", {"MODELQ_KEY_PREFIX": "teamb",
                                                  "MODELQ_TEST_STAGE_DELAY": "loading:20"},
                       key_prefix="teamb")
    (tmp_path / "b").mkdir()
    b_client = Client(Settings(redis_url=redis_url, key_prefix="teamb", heartbeat_seconds=0.5,
                               worker_ttl_seconds=3, connect_timeout_seconds=2))
    try:
        started = [pool.start("w1", wait=False), pool.start("w2", wait=False)]
        b_worker = other.start("w1", wait=False)  # the same name, in the other deployment
        for worker in started:
            pool.wait_registered(worker, timeout=180)
        other.wait_registered(b_worker, timeout=180)
        b_queue = b_client.keys.worker_queue("w1")
        b_first = b_client.submit(LoadJob(model=ModelRef(path=str(models["llama"]))))
        wait_stage(b_client, b_first.job_id, Stage.loading)
        b_second = b_client.submit(LoadJob(model=ModelRef(path=str(models["qwen2"]))))
        assert client.redis.llen(b_queue) == 1  # waits behind the slow load, on B's w1 queue

        victim = started[0]
        victim.kill()  # A's w1 dies; a job is then sent to its own queue, nobody to take it
        dead_queue = client.keys.worker_queue("w1")
        monkeypatch.setattr(client.registry, "queue_for", lambda job, route: dead_queue)
        orphan = client.submit(LoadJob(model=ModelRef(path=str(models["mistral"]))))
        record = orphan.wait(timeout=120)
        assert record.status is JobStatus.succeeded and record.worker == "w2", record.error
        assert "from modelq.worker.w1 to modelq" in started[1].log_text()

        assert client.redis.llen(b_queue) == 1  # B's waiting job stayed where it was
        assert client.redis.exists(b_client.keys.worker("w1"))
        assert b_client.status(b_second.job_id).status is JobStatus.queued
        assert b_client.status(b_first.job_id).status is JobStatus.running
        for handle in (b_first, b_second):
            done = handle.wait(timeout=120)
            assert done.status is JobStatus.succeeded and done.worker == "w1", done.error
            assert done.attempt == 1
        assert [w.name for w in b_client.workers()] == ["w1"] and b_worker.alive()
        assert "moved" not in b_worker.log_text()
        wait_for(lambda: not client.redis.exists(dead_queue), 10, "A's dead queue emptied")
    finally:
        other.stop_all()
