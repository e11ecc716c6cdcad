"""Long run jobs end to end: real Redis, real `modelq worker` processes, a user task module
(tests/support/long_tasks.py: `tests.sleep` runs as long as told and marks each start).

- A run job longer than the broker's visibility timeout is started once: the broker
  delivers it again meanwhile, and the lease of the worker running it turns that delivery
  away. The visibility timeout is shortened to 4 s there, because on the default (the load
  limit plus 600 s: 4,200 s) the broker would deliver it again only after 70 minutes, longer
  than a test can wait. Users run the default: the twin below runs on default settings.
  The same workers set MODELQ_MAX_RUN_SECONDS, the limit of a run job without its own.
- On defaults: a run job has no hidden time limit (its record says so), runs once, and a
  model whose keep-alive is shorter than the job stays resident after it for its keep-alive
  (counted from the job's end).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob
from tasks.client import Client
from tasks.state.keys import SHARED_QUEUE
from tests.support.fault_waits import VISIBILITY_TIMEOUT, started_events, wait_for
from tests.support.long_tasks import marker_lines
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e
TASKS = ("--tasks", "tests.support.long_tasks")


def test_a_run_longer_than_the_visibility_timeout_is_started_once(
        client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MODELQ_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT),
           "MODELQ_MAX_RUN_SECONDS": "3"}
    workers = [pool.start(name, *TASKS, env=env, wait=False) for name in ("v1", "v2")]
    for worker in workers:
        pool.wait_registered(worker, timeout=180)
    # Sent to the shared queue, so that the broker's second delivery reaches the idle worker
    # (on the runner's own queue it would wait behind the job it repeats).
    monkeypatch.setattr(client.registry, "queue_for", lambda job, route: SHARED_QUEUE)
    marker = tmp_path / "starts.txt"
    load = LoadJob(model=str(models["llama"]))
    record = client.run("tests.sleep", model=load, timeout_seconds=60,
                        kwargs={"seconds": 3 * VISIBILITY_TIMEOUT, "marker": str(marker)}
                        ).wait(timeout=180)
    assert record.status is JobStatus.succeeded, record.error
    assert len(marker_lines(marker)) == 1  # the task body ran once
    assert record.attempt == 1 and len(started_events(client, record.job_id)) == 1
    other = next(w for w in workers if w.name != record.worker)
    assert "holds its lease" in other.log_text()  # the broker did deliver it again
    assert record.time_limit_seconds == 60  # its own timeout wins over MODELQ_MAX_RUN_SECONDS

    over = client.run("tests.sleep", model=load, kwargs={"seconds": 30}).wait(timeout=120)
    assert over.status is JobStatus.failed and over.error is not None
    assert over.error.type == "TimedOut" and "3s limit" in over.error.message
    assert over.time_limit_seconds == 3  # MODELQ_MAX_RUN_SECONDS, shown in the record


def test_on_defaults_a_long_run_has_no_limit_runs_once_and_keep_alive_counts_from_its_end(
        client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path) -> None:
    pool.start("d1", *TASKS)
    keep_alive = 4.0
    loaded = client.submit(LoadJob(model=str(models["llama"]), keep_alive_seconds=keep_alive)
                           ).wait(timeout=120)
    assert loaded.time_limit_seconds == 3600  # a load's limit: MODELQ_MAX_LOAD_SECONDS
    key = loaded.result.model_key  # type: ignore[union-attr]

    def resident() -> bool:
        return any(w.holds(key) for w in client.workers())

    marker = tmp_path / "starts.txt"
    record = client.run("tests.sleep", model=key,
                        kwargs={"seconds": 2 * keep_alive, "marker": str(marker)}).wait(timeout=120)
    ended = time.monotonic()
    assert record.status is JobStatus.succeeded, record.error
    assert record.time_limit_seconds is None and len(marker_lines(marker)) == 1
    # Counted from the job's start, the keep-alive passed 4 s before it ended, and the
    # sweep (every second) would have unloaded the model a second or two after its end.
    while time.monotonic() - ended < keep_alive / 2:
        assert resident(), "the model was unloaded right after the job"
        time.sleep(0.1)
    wait_for(lambda: not resident(), 15, "the keep-alive to pass after the job")
    assert time.monotonic() - ended >= keep_alive - 1.0
