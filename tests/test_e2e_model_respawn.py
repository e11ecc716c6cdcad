"""A model key outlives its worker, end to end: real Redis, real `modelq worker` processes.

A run job naming a model key whose only holder was killed (SIGKILL) is loaded again, from
the load spec that made the key, by the worker that takes it: one submitted after the death
(routing sends it where a load would go), and 16 queued on the holder when it dies (the
reaper moves them to the shared queue). Settings are the pool's test ones (a 3 s worker
TTL, so a death is seen in seconds); the broker's visibility timeout is the default, which
plays no part here (the reaper and the rescue sweep deliver a dead worker's jobs again).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob, RunResult
from tasks.client import Client
from tests.support.fault_waits import wait_for
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e
GENERATE = {"prompts": "the quick brown fox", "max_new_tokens": 4}


def _holders(client: Client, key: str) -> set[str]:
    return {w.name for w in client.workers() if w.holds(key)}


def test_a_model_key_is_loaded_again_after_its_only_holder_is_killed(
        client: Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    first = pool.start("first")
    loaded = client.submit(LoadJob(model=str(models["llama"]), keep_alive_seconds=600)).wait(
        timeout=120)
    assert loaded.status is JobStatus.succeeded, loaded.error
    key = loaded.result.model_key  # type: ignore[union-attr]
    expected = client.run("modelq.generate", model=key, kwargs=GENERATE).wait(timeout=60)
    assert expected.status is JobStatus.succeeded, expected.error
    second = pool.start("second")

    # --- a run submitted after its only holder died: loaded again on the other worker ----
    first.kill()
    wait_for(lambda: "first" not in {w.name for w in client.workers()}, 30, "first's entry to lapse")
    record = client.run("modelq.generate", model=key, kwargs=GENERATE).wait(timeout=120)
    assert record.status is JobStatus.succeeded, record.error
    assert isinstance(record.result, RunResult)
    assert record.worker == "second" and record.result.model_key == key
    assert record.result.cache_hit is False  # it was loaded for this job
    assert record.result.value == expected.result.value  # type: ignore[union-attr]
    assert record.result.model.keep_alive_seconds == 600  # as the load spec said
    assert _holders(client, key) == {"second"}

    # --- 16 one-prompt jobs queued on the holder when it is killed: all finish -----------
    third = pool.start("third")
    handles = [client.run("modelq.generate", model=key, kwargs=GENERATE) for _ in range(16)]
    second.kill()
    records = [handle.wait(timeout=180) for handle in handles]
    failed = [(r.job_id, r.error) for r in records if r.status is not JobStatus.succeeded]
    assert failed == []
    assert all(r.result.value == expected.result.value for r in records)  # type: ignore[union-attr]
    assert any(r.worker == third.name for r in records)  # the survivor loaded it and ran them
    assert _holders(client, key) == {"third"}
