"""Worker faults on the settings users run: no shortened heartbeat, TTL or visibility timeout.

tests/support/workers.py starts every worker with a 0.5 s heartbeat and a 3 s TTL, and
tests/test_reliability_worker.py adds a 4 s visibility timeout; these tests are their twins
with the defaults put back (2 s heartbeat, 10 s worker TTL, max_load_seconds + 600 s
visibility timeout, 3 attempts), so what they time is what a deployment gets. Only the
test hooks cue the faults (a stage delay, a model path that kills its worker), and they
change no setting. The defaults are quick where it matters: a dead worker's job is put back
by the reaper within 1.5 worker TTLs of its last beat (worker/recovery/reaper.py), not
after the visibility timeout; a cancel is seen within CANCEL_POLL_SECONDS (0.1 s) of a
progress tick; a job's own timeout is the job's.
"""

from __future__ import annotations

import signal
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from schemas import JobKind, JobRecord, JobStatus, LoadJob, ModelRef, Stage
from tasks.client import Client, JobHandle
from tasks.settings import Settings
from tasks.state.keys import worker_queue
from tasks.state.store import now
from tests.support.fault_waits import marked_model, started_events, wait_for, wait_stage
from tests.support.workers import WorkerPool
from worker.fault_hooks import KILL_MARKER

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_FIELDS = Settings.model_fields
DEFAULTS = {"MODELQ_HEARTBEAT_SECONDS": str(_FIELDS["heartbeat_seconds"].default),
            "MODELQ_WORKER_TTL_SECONDS": str(_FIELDS["worker_ttl_seconds"].default)}
"""The real defaults, over the pool's shortened test timings."""

AFTER = 8.0
"""Seconds until a lost message's grace is up, in the test of the resend."""

FAULTS = {**DEFAULTS, "MODELQ_TEST_FAULTS": "1"}
"""The defaults, with model paths carrying a fault marker acting on it (a test hook)."""


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
    # The delay only has to outlast the moment between seeing `loading` and the kill.
    workers = pool.start_all(["w1", "w2"], {**DEFAULTS, "MODELQ_TEST_STAGE_DELAY": "loading:5"})
    handle = default_client.submit(LoadJob(model=ModelRef(path=str(models["llama"]))))
    running = wait_stage(default_client, handle.job_id, Stage.loading)
    victim = next(w for w in workers if w.name == running.worker)
    victim.kill()
    killed = time.monotonic()

    record = handle.wait(timeout=120)
    took = time.monotonic() - killed
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempt == 2 and record.worker != victim.name
    assert took < 60, f"took {took:.0f}s after the kill (5 s of it the second load)"
    starts = started_events(default_client, handle.job_id)
    assert len(starts) == 2 and f"worker {victim.name} was lost during attempt 1" in starts[1]
    assert terminal_writes(default_client, handle.job_id) == 1
    rescuer = next(w for w in workers if w is not victim)
    assert "put its message back" in rescuer.log_text()


def test_queued_record_without_a_message_is_sent_and_runs_once(default_client: Client,
                                                               pool: WorkerPool,
                                                               models: dict[str, Path]) -> None:
    """What a submit leaves when Redis fails between writing the record and sending its
    message. The record is written as if submitted `grace - AFTER` seconds ago, so the
    default 30 s grace is up AFTER seconds from now: the test waits that, not 30 s (that no
    sweep sends it before its grace is also tests/test_rescue.py's, on a fake clock)."""
    worker = pool.start("w1", env=DEFAULTS, timeout=180)
    job = LoadJob(model=ModelRef(path=str(models["qwen2"])))
    job_id = uuid.uuid4().hex
    grace = _FIELDS["lost_job_grace_seconds"].default
    submitted_at = now() - timedelta(seconds=grace - AFTER)
    default_client.store.create(JobRecord(job_id=job_id, kind=JobKind(job.kind), tenant=job.tenant,
                                          status=JobStatus.queued, created_at=submitted_at, job=job))
    written = time.monotonic()

    record = JobHandle(default_client, job_id).wait(timeout=120)
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempt == 1
    reap_every = _FIELDS["worker_ttl_seconds"].default / 2  # worker/recovery/reaper.py's turns
    assert AFTER <= time.monotonic() - written < AFTER + reap_every + 30
    assert len(started_events(default_client, job_id)) == 1
    assert terminal_writes(default_client, job_id) == 1
    assert "with no message on any queue" in worker.log_text()


def test_crash_loop_stops_after_the_default_attempts_and_the_queue_drains(
        default_client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path) -> None:
    """Twin of test_reliability_worker's crash loop: each death is seen within 1.5 worker TTLs
    (15 s), so the default 3 attempts take well under a minute."""
    live = pool.start_all(["w1", "w2"], FAULTS)
    bad = default_client.submit(LoadJob(model=ModelRef(path=str(
        marked_model(models["llama"], tmp_path, KILL_MARKER)))))
    good = [default_client.submit(LoadJob(model=ModelRef(path=str(models[m]))))
            for m in ("qwen2", "mistral")]
    pool.supervise(live, FAULTS, lambda: default_client.status(bad.job_id).terminal, 150, first=3)

    record = bad.wait(timeout=10)
    attempts = _FIELDS["max_attempts"].default
    assert record.status is JobStatus.failed and record.error is not None
    assert record.error.type == "WorkerLost" and f"died {attempts} times" in record.error.message
    assert record.attempt == attempts and sum(not w.alive() for w in pool) == attempts
    assert terminal_writes(default_client, bad.job_id) == 1
    for handle in good:
        done = handle.wait(timeout=120)
        assert done.status is JobStatus.succeeded and done.attempt == 1, done.error


def test_a_load_longer_than_the_worker_ttl_runs_once_and_sigterm_finishes_a_load(
        default_client: Client, pool: WorkerPool, models: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Twin of test_reliability_worker's long load and SIGTERM: two 12 s loads at once, each
    longer than the 10 s worker TTL (the heartbeat keeps its lease, so no sweep puts its
    message back), one of them on a worker told to stop (it finishes the load, then leaves)."""
    w1, w2 = pool.start_all(["w1", "w2"], {**DEFAULTS, "MODELQ_TEST_STAGE_DELAY": "loading:12"})
    handles = []
    for worker, model in ((w1, "llama"), (w2, "qwen2")):
        monkeypatch.setattr(default_client.registry, "queue_for",
                            lambda job, route, name=worker.name: worker_queue(name))
        handles.append(default_client.submit(LoadJob(model=ModelRef(path=str(models[model])))))
    for handle in handles:
        wait_stage(default_client, handle.job_id, Stage.loading)
    w2.proc.send_signal(signal.SIGTERM)
    assert w2.proc.wait(60) == 0
    assert [w.name for w in default_client.workers()] == ["w1"]  # it left the registry
    for handle, worker in zip(handles, (w1, w2), strict=True):
        record = handle.wait(timeout=60)
        assert record.status is JobStatus.succeeded and record.worker == worker.name, record.error
        assert record.attempt == 1 and len(started_events(default_client, handle.job_id)) == 1
        assert all(e.status is not JobStatus.failed for _, e in default_client.store.events(handle.job_id))
    assert "put its message back" not in w1.log_text()


def test_cancel_and_timeout_mid_load(default_client: Client, pool: WorkerPool,
                                     models: dict[str, Path]) -> None:
    """Twin of test_reliability_worker's cancel and timeout: a cancel stops a 30 s load within
    a progress tick, a job's own timeout_seconds stops it at its limit; nothing of either
    stays resident."""
    pool.start("w1", env={**DEFAULTS, "MODELQ_TEST_STAGE_DELAY": "loading:30"}, timeout=180)
    job = LoadJob(model=ModelRef(path=str(models["llama"])))
    handle = default_client.submit(job)
    wait_stage(default_client, handle.job_id, Stage.loading)
    asked = time.monotonic()
    handle.cancel()
    record = handle.wait(timeout=30)
    assert record.status is JobStatus.cancelled and time.monotonic() - asked < 10

    started = time.monotonic()
    record = default_client.submit(job.model_copy(update={"timeout_seconds": 3.0})).wait(timeout=30)
    assert record.status is JobStatus.failed and record.error is not None
    assert record.error.type == "TimedOut" and "3s limit" in record.error.message
    assert time.monotonic() - started < 15  # not the 30 s the load would take
    info = wait_for(lambda: next(iter(default_client.workers()), None), 10, "w1's entry")
    assert info.models == () and info.free_bytes == info.capacity_bytes
