"""The worker's composition root, built in this process with a real Redis and no Celery:
a job message handed to `WorkerApp.run` ends in the same record a Celery delivery writes."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis

from schemas import Envelope, Job, JobRecord, JobStatus, LoadJob, RunResult, UnloadJob, parse_job
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import Keys, worker_queue
from tasks.state.store import now, submitted
from worker.app import WorkerApp, WorkerOptions
from worker.fault_hooks import FaultSettings
from worker.jobs.attempt import Outcome


def _deliver(app: WorkerApp, client: Client, job: Job | dict[str, object]) -> JobRecord:
    """Write the record as a producer does, then hand the message to the app as Celery would."""
    parsed = parse_job(job) if isinstance(job, dict) else job
    job_id = uuid.uuid4().hex
    record = submitted(job_id, parsed, now())
    client.store.create(record)
    envelope = Envelope(job_id=job_id, submitted_at=record.created_at, job=parsed)
    assert app.run(envelope.model_dump(mode="json")) is Outcome.done
    return client.store.get(job_id)


def test_a_worker_app_runs_jobs_without_celery(settings: Settings, models: dict[str, Path],
                                               tmp_path: Path) -> None:
    app = WorkerApp(settings.model_copy(update={"artifact_dir": str(tmp_path / "artifacts")}),
                    WorkerOptions(name="inproc", capacity=2**30), faults=FaultSettings())
    client = Client(settings)
    assert app.queues == ["modelq", worker_queue("inproc")]
    app.start()
    try:
        entry = redis.Redis.from_url(settings.redis_url).get(Keys().worker("inproc"))
        assert entry is not None and b"modelq.generate" in entry  # the tasks it offers
        loaded = _deliver(app, client, LoadJob(model=str(models["llama"])))
        assert loaded.status is JobStatus.succeeded and loaded.worker == "inproc"
        key = loaded.result.model_key  # type: ignore[union-attr]
        again = _deliver(app, client, LoadJob(model=str(models["llama"])))
        assert again.result.cache_hit and again.result.model_key == key  # type: ignore[union-attr]
        ran = _deliver(app, client, {"kind": "run", "task": "modelq.generate", "model": key,
                                     "kwargs": {"prompts": "the quick", "max_new_tokens": 3}})
        assert ran.status is JobStatus.succeeded and isinstance(ran.result, RunResult)
        assert isinstance(ran.result.value, list) and len(ran.result.value) == 1
        gone = _deliver(app, client, UnloadJob(model_key=key))
        assert gone.status is JobStatus.succeeded and app.cache.entries() == []
    finally:
        app.stop()
    assert redis.Redis.from_url(settings.redis_url).get(Keys().worker("inproc")) is None


def test_a_multi_tenant_workers_own_shares_are_drained_when_it_dies(settings: Settings,
                                                                     tmp_path: Path) -> None:
    from tasks.tenants import parse_tenants
    from worker.recovery.reaper import Reaper

    tenants = parse_tenants({"tenants": {"acme": {"key": "k" * 32, "priority": 2}}})
    app = WorkerApp(settings.model_copy(update={"artifact_dir": str(tmp_path / "artifacts")}),
                    WorkerOptions(name="mt", capacity=2**30), faults=FaultSettings(), tenants=tenants)
    keys, client = Keys(), redis.Redis.from_url(settings.redis_url)
    shares = keys.tenant_queues("acme", 2, base=worker_queue("mt"))
    assert app.queues == ["modelq", worker_queue("mt")]  # it consumes two queues, not the shares
    assert set(shares) <= set(app.own_queues)
    app.heartbeat.register()  # registered, never beating: as if it died at once
    client.lpush(shares[1], "routed-to-mt")
    client.delete(keys.worker("mt"))
    client.zadd(keys.deadlines(), {"mt": 1})
    assert Reaper(client, keys, every=1, worker="other").run() == 1
    assert client.lrange(keys.tenant_queues("acme", 2)[1], 0, -1) == [b"routed-to-mt"]
