"""The fault hooks (worker/fault_hooks.py) add faults to the path a job takes anyway.

Built in this process with a real Redis and no Celery (as tests/test_worker_app.py does), a
worker with every hook on must still serve a repeated load from its cache in one write, as a
production worker does: the tests in tests/test_reliability_*.py then exercise the path users
run, with a fault added, not a path only tests take.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest

from schemas import Envelope, JobRecord, JobStatus, LoadJob
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.store import now, submitted
from worker.app import WorkerApp, WorkerOptions
from worker.fault_hooks import FaultSettings
from worker.jobs.attempt import Outcome

DELAY = 2.0
"""Seconds every job waits on entering `resolving`: a repeated load that took the full path
would wait them out, one served from the cache enters no stage."""


def deliver(app: WorkerApp, client: Client, job: LoadJob) -> tuple[JobRecord, float]:
    """Write the record as a producer does, hand the message to the app as Celery would;
    the final record and the seconds the delivery took."""
    job_id = uuid.uuid4().hex
    record = submitted(job_id, job, now())
    client.store.create(record)
    envelope = Envelope(job_id=job_id, submitted_at=record.created_at, job=job)
    started = time.monotonic()
    assert app.run(envelope.model_dump(mode="json")) is Outcome.done
    return client.store.get(job_id), time.monotonic() - started


def test_a_worker_with_every_hook_on_still_serves_a_cache_hit_in_one_write(
        settings: Settings, models: dict[str, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    hooks = FaultSettings(stage_delay=f"resolving:{DELAY}", faults=True, fail_alloc=1)
    app = WorkerApp(settings.model_copy(update={"artifact_dir": str(tmp_path / "artifacts")}),
                    WorkerOptions(name="hooked", capacity=2**30), faults=hooks)
    client = Client(settings)
    app.start()
    try:
        with caplog.at_level(logging.INFO):
            cold, cold_took = deliver(app, client, LoadJob(model=str(models["llama"])))
            # The injected allocation failure took the out-of-memory retry a real one takes.
            assert cold.status is JobStatus.succeeded, cold.error
            assert "out of memory loading" in caplog.text and "retrying once" in caplog.text
            assert cold_took >= DELAY  # the stage delay is on
            assert cold.result is not None and not cold.result.cache_hit

            hit, hit_took = deliver(app, client, LoadJob(model=str(models["llama"])))
        assert hit.status is JobStatus.succeeded and hit.result is not None
        assert hit.result.cache_hit and hit.result.model_key == cold.result.model_key
        assert f"job {hit.job_id}: load served from the cache on hooked" in caplog.text
        assert hit_took < DELAY, f"the cache hit took {hit_took:.1f}s: it ran in full"
        statuses = [e.status for _, e in client.store.events(hit.job_id)]
        assert statuses == [JobStatus.queued, JobStatus.running, JobStatus.succeeded]
    finally:
        app.stop()
