"""Lost jobs on the settings users run: no shortened heartbeat, TTL or visibility timeout.

tests/support/workers.py starts every worker with a 0.5 s heartbeat and a 3 s TTL; these
tests put the defaults back, so what they time is what a deployment gets: a job whose
worker was killed mid-load, or whose message was lost, finishes within about a minute,
not after the broker's visibility timeout (max_load_seconds + 600 s).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from schemas import JobKind, JobRecord, JobStatus, LoadJob, ModelRef, Stage
from tasks.client import Client, JobHandle
from tasks.settings import Settings
from tasks.store import now
from tests.support.fault_waits import started_events, wait_stage
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_FIELDS = Settings.model_fields
DEFAULTS = {"MODELQ_HEARTBEAT_SECONDS": str(_FIELDS["heartbeat_seconds"].default),
            "MODELQ_WORKER_TTL_SECONDS": str(_FIELDS["worker_ttl_seconds"].default)}
"""The real defaults, over the pool's shortened test timings."""


@pytest.fixture
def default_client(redis_url: str) -> Client:
    return Client(Settings(redis_url=redis_url))


def terminal_writes(client: Client, job_id: str) -> int:
    """How many events moved the job to a terminal status (one, if it ended once)."""
    return sum(1 for _, e in client.store.events(job_id) if e.status in
               (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled))


def test_kill_9_mid_load_finishes_elsewhere_within_a_minute(default_client: Client,
                                                            pool: WorkerPool,
                                                            models: dict[str, Path]) -> None:
    env = {**DEFAULTS, "MODELQ_TEST_STAGE_DELAY": "loading:30"}
    workers = [pool.start(name, env=env, wait=False) for name in ("w1", "w2")]
    for worker in workers:
        pool.wait_registered(worker, timeout=180)
    handle = default_client.submit(LoadJob(model=ModelRef(path=str(models["llama"]))))
    running = wait_stage(default_client, handle.job_id, Stage.loading)
    victim = next(w for w in workers if w.name == running.worker)
    victim.kill()
    killed = time.monotonic()

    record = handle.wait(timeout=120)
    took = time.monotonic() - killed
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempt == 2 and record.worker != victim.name
    assert took < 90, f"took {took:.0f}s after the kill (30 s of it the second load)"
    starts = started_events(default_client, handle.job_id)
    assert len(starts) == 2 and f"worker {victim.name} was lost during attempt 1" in starts[1]
    assert terminal_writes(default_client, handle.job_id) == 1
    rescuer = next(w for w in workers if w is not victim)
    assert "put its message back" in rescuer.log_text()


def test_queued_record_without_a_message_is_sent_and_runs_once(default_client: Client,
                                                               pool: WorkerPool,
                                                               models: dict[str, Path]) -> None:
    # What a submit leaves when Redis fails between writing the record and sending its message.
    job = LoadJob(model=ModelRef(path=str(models["qwen2"])))
    job_id = uuid.uuid4().hex
    default_client.store.create(JobRecord(job_id=job_id, kind=JobKind(job.kind), tenant=job.tenant,
                                          status=JobStatus.queued, created_at=now(), job=job))
    written = time.monotonic()
    pool.start("w1", env=DEFAULTS, timeout=180)

    record = JobHandle(default_client, job_id).wait(timeout=120)
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempt == 1
    grace = _FIELDS["lost_job_grace_seconds"].default
    assert grace <= time.monotonic() - written < grace + 60
    assert len(started_events(default_client, job_id)) == 1
    assert terminal_writes(default_client, job_id) == 1
