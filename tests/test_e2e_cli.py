"""The CLI as a user runs it (`python -m tasks.cli`), with no worker at first: invalid input
is refused with exit 2 and nothing enqueued, `--wait --timeout` exits 3, and a queued job
cancelled before any worker starts is never run by the worker that starts later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from schemas import JobRecord, JobStatus, LoadJob
from tasks.client import Client
from tasks.state.keys import SHARED_QUEUE
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELQ_REDIS_URL": redis_url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


@pytest.mark.parametrize("args, says", [
    (["--quant", "int8", "--double-quant"], "double_quant"),
    (["--quant", "none", "--skip-module", "lm_head"], "need a method"),
    (["--device-map", "gpu"], "device"),
    (["--max-memory", "cpu"], "DEV=SIZE"),
    (["--adapter", "a/b/c"], "adapters"),
    (["--tenant", "Bad Tenant"], "tenant"),
])
def test_invalid_input_exits_2_and_enqueues_nothing(redis_url: str, models: dict[str, Path],
                                                     args: list[str], says: str) -> None:
    done = cli(redis_url, "load", str(models["llama"]), *args, "--wait")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "error:" in done.stderr and says in done.stderr and done.stdout == ""
    server = redis.Redis.from_url(redis_url)
    assert server.dbsize() == 0 and server.llen(SHARED_QUEUE) == 0


def test_bad_repo_id_exits_2(redis_url: str) -> None:
    done = cli(redis_url, "load", "org--x/model")
    assert done.returncode == 2 and "'--'" in done.stderr
    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_wait_timeout_with_no_worker_exits_3(redis_url: str, models: dict[str, Path]) -> None:
    done = cli(redis_url, "load", str(models["llama"]), "--wait", "--timeout", "0.5", "--json")
    assert done.returncode == 3, done.stderr
    assert "still queued" in done.stderr
    assert JobRecord.model_validate_json(done.stdout).status is JobStatus.queued


def test_job_cancelled_while_queued_is_never_run(redis_url: str, client: Client, pool: WorkerPool,
                                                  models: dict[str, Path]) -> None:
    submitted = cli(redis_url, "load", str(models["mistral"]))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert client.status(job_id).status is JobStatus.queued

    cancelled = cli(redis_url, "cancel", job_id)
    assert cancelled.returncode == 0 and f"{job_id} cancelled" in cancelled.stdout
    record = client.status(job_id)
    assert record.status is JobStatus.cancelled
    unknown = cli(redis_url, "status", "no-such-job")
    assert unknown.returncode == 2 and "no job" in unknown.stderr

    worker = pool.start("late")
    after = client.submit(LoadJob(model=str(models["llama"]))).wait(timeout=120)
    assert after.status is JobStatus.succeeded and after.worker == "late"
    assert client.status(job_id) == record and record.attempt == 0 and record.worker is None
    assert client.redis.llen(SHARED_QUEUE) == 0
    assert f"job {job_id}: already ended" in worker.log_text()
    waited = cli(redis_url, "status", job_id)
    assert waited.returncode == 0 and "cancelled" in waited.stdout


def test_a_setting_that_does_not_parse_exits_2_naming_it(redis_url: str) -> None:
    env = {**os.environ, "MODELQ_REDIS_URL": redis_url, "MODELQ_MAX_ATTEMPTS": "zero"}
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "ls"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "max_attempts" in result.stderr and "MODELQ_" in result.stderr
    assert "Traceback" not in result.stderr
