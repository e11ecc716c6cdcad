"""Two deployments on one Redis, told apart by MODELQ_KEY_PREFIX: queues and kombu's unacked
hash included.

A worker killed mid-load in one pool has its job put back and its own queue moved by that
pool's reaper only; the other pool's queues, unacked entries, registry and jobs (its worker
even has the same name) are left alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob, ModelRef, Stage
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import Keys
from tests.support.fault_waits import wait_for, wait_stage
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
    assert (keys.unacked(), other.unacked_index()) == ("modelq:unacked", "team*b:unacked:index")


def test_two_prefixes_share_one_redis(client: Client, redis_url: str, tmp_path: Path,
                                      pool: WorkerPool, models: dict[str, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # B's loads (both of them: 2 x 12 s) outlast A's worker death and its job's redelivery
    # (some 3-5 s); A's w1 is killed mid-load, so its delay is never waited out.
    slow = {"MODELQ_TEST_STAGE_DELAY": "loading:20"}
    other = WorkerPool(redis_url, tmp_path / "b", {"MODELQ_KEY_PREFIX": "teamb",
                                                  "MODELQ_TEST_STAGE_DELAY": "loading:12"},
                       key_prefix="teamb")
    (tmp_path / "b").mkdir()
    b_client = Client(Settings(redis_url=redis_url, key_prefix="teamb", heartbeat_seconds=0.5,
                               worker_ttl_seconds=3, connect_timeout_seconds=2))
    a_keys, b_keys = client.keys, b_client.keys
    try:
        started = [pool.start("w1", wait=False, env=slow), pool.start("w2", wait=False)]
        b_worker = other.start("w1", wait=False)  # the same name, in the other deployment
        for worker in started:
            pool.wait_registered(worker, timeout=180)
        other.wait_registered(b_worker, timeout=180)
        b_queue = b_keys.worker_queue("w1")
        b_first = b_client.submit(LoadJob(model=ModelRef(path=str(models["llama"]))))
        wait_stage(b_client, b_first.job_id, Stage.loading)
        b_second = b_client.submit(LoadJob(model=ModelRef(path=str(models["qwen2"]))))
        assert client.redis.llen(b_queue) == 1  # waits behind the slow load, on B's w1 queue

        dead_queue = a_keys.worker_queue("w1")  # A's two jobs go to A's w1, which dies mid-load
        monkeypatch.setattr(client.registry, "queue_for", lambda job, route: dead_queue)
        a_first = client.submit(LoadJob(model=ModelRef(path=str(models["mistral"]))))
        wait_stage(client, a_first.job_id, Stage.loading)
        a_second = client.submit(LoadJob(model=ModelRef(path=str(models["qwen2"]))))
        assert client.redis.hlen(a_keys.unacked()) == client.redis.hlen(b_keys.unacked()) == 1
        assert not client.redis.exists("unacked")  # kombu's global hash is no one's now
        b_unacked = client.redis.hgetall(b_keys.unacked())
        started[0].kill()  # SIGKILL, mid-load

        wait_for(lambda: client.status(a_first.job_id).attempt == 2, 60, "A's job redelivered")
        assert client.redis.hgetall(b_keys.unacked()) == b_unacked  # B's entry untouched
        assert b_client.status(b_first.job_id).status is JobStatus.running
        for handle in (a_first, a_second):
            record = handle.wait(timeout=120)
            assert record.status is JobStatus.succeeded and record.worker == "w2", record.error
        log_text = started[1].log_text()
        assert "from modelq.worker.w1 to modelq" in log_text and "put its message back" in log_text

        assert client.redis.llen(b_queue) == 1  # B's waiting job stayed where it was
        assert client.redis.exists(b_keys.worker("w1"))
        assert b_client.status(b_second.job_id).status is JobStatus.queued
        for handle in (b_first, b_second):
            done = handle.wait(timeout=120)
            assert done.status is JobStatus.succeeded and done.worker == "w1", done.error
            assert done.attempt == 1
        assert [w.name for w in b_client.workers()] == ["w1"] and b_worker.alive()
        assert "moved" not in b_worker.log_text() and "put its message" not in b_worker.log_text()
        wait_for(lambda: not client.redis.exists(dead_queue), 10, "A's dead queue emptied")
    finally:
        other.stop_all()
