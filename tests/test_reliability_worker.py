"""Worker faults end to end: kill -9 mid-load, crash loops, long loads, SIGTERM, cancel, timeout,
and a poisoned CUDA context, each against real `modelq worker` subprocesses.

Faults are cued by the test hooks in worker/fault_hooks.py (a stage delay, and model paths
carrying a fault marker); the visibility timeout is 4 s so redelivery is quick to see.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from schemas import AdapterSpec, JobStatus, LoadJob, ModelRef, Stage
from tasks.client import Client
from tasks.state.keys import SHARED_QUEUE
from tests.support.fault_waits import (
    fault_env,
    marked_model,
    resident_copies,
    started_events,
    wait_for,
    wait_stage,
)
from tests.support.workers import WorkerPool
from worker.app import EXIT_POISONED
from worker.fault_hooks import CUDA_MARKER, KILL_MARKER

pytestmark = pytest.mark.e2e


def registered(client: Client) -> set[str]:
    return {w.name for w in client.workers()}


def test_kill_9_mid_load_redelivers_and_completes_once(client: Client, pool: WorkerPool,
                                                        models: dict[str, Path]) -> None:
    env = fault_env("loading:3")
    live = pool.start_all(["w1", "w2"], env)
    for n, dtype in enumerate(("float32", "bfloat16"), start=3):  # then on the replacement pool
        handle = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])), dtype=dtype))
        running = wait_stage(client, handle.job_id, Stage.loading)
        victim = next(w for w in live if w.name == running.worker)
        victim.kill()
        live.remove(victim)
        live.append(pool.start(f"w{n}", env=env, wait=False))  # keep two workers, as a supervisor would

        record = handle.wait(timeout=120)
        assert record.status is JobStatus.succeeded, record.error
        assert record.attempt == 2
        assert record.worker != victim.name
        starts = started_events(client, handle.job_id)
        assert len(starts) == 2 and f"worker {victim.name} was lost during attempt 1" in starts[1]
        assert record.result is not None
        key = record.result.model_key
        wait_for(lambda: resident_copies(client, key) == 1, 30, "one resident copy")  # noqa: B023


def test_crash_loop_stops_as_worker_lost_and_the_queue_drains(client: Client, pool: WorkerPool,
                                                              models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    env = fault_env(MODELQ_MAX_ATTEMPTS="2")
    live = pool.start_all(["w1", "w2"], env)
    marked = marked_model(models["llama"], tmp_path, KILL_MARKER)
    bad = client.submit(LoadJob(model=ModelRef(path=str(marked))))
    good = [client.submit(LoadJob(model=ModelRef(path=str(models[m])))) for m in ("qwen2", "mistral")]

    deaths = pool.supervise(live, env, lambda: client.status(bad.job_id).terminal, 180, first=3)

    record = bad.wait(timeout=10)
    assert record.status is JobStatus.failed and record.error is not None
    assert record.error.type == "WorkerLost" and record.error.retryable
    assert record.attempt == 2
    assert deaths == 2 or sum(not w.alive() for w in pool) == 2
    for handle in good:
        done = handle.wait(timeout=120)
        assert done.status is JobStatus.succeeded, done.error


def test_long_load_runs_once_and_sigterm_finishes_the_job(client: Client, pool: WorkerPool,
                                                          models: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A 7 s load outlives the 4 s visibility timeout: the broker redelivers it meanwhile. Sent
    # to the shared queue (as when no worker is preferred), the copy reaches the idle worker.
    live = pool.start_all(["w1", "w2"], fault_env("loading:7"))
    monkeypatch.setattr(client.registry, "queue_for", lambda job, route: SHARED_QUEUE)
    handle = client.submit(LoadJob(model=ModelRef(path=str(models["llama"]))))
    holder = wait_stage(client, handle.job_id, Stage.loading).worker
    record = handle.wait(timeout=120)
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempt == 1 and record.worker == holder
    assert len(started_events(client, handle.job_id)) == 1
    other = next(w for w in live if w.name != holder)
    assert "holds its lease" in other.log_text()  # the second delivery was turned away

    # SIGTERM mid-load: the job finishes (or is handed back), never fails; the worker leaves.
    handle = client.submit(LoadJob(model=ModelRef(path=str(models["qwen2"]))))
    running = wait_stage(client, handle.job_id, Stage.loading)
    stopping = next(w for w in live if w.name == running.worker)
    stopping.proc.send_signal(signal.SIGTERM)
    assert stopping.proc.wait(120) == 0
    assert stopping.name not in registered(client)
    record = handle.wait(timeout=120)
    assert record.status is JobStatus.succeeded, record.error
    assert all(e.status is not JobStatus.failed for _, e in client.store.events(handle.job_id))


def test_cancel_timeout_and_poisoned_cuda_context(client: Client, pool: WorkerPool,
                                                  models: dict[str, Path], tmp_path: Path) -> None:
    worker = pool.start("w1", env=fault_env("attaching:30"))
    job = LoadJob(model=ModelRef(path=str(models["llama"])), adapters=(AdapterSpec(ref=str(models["lora"])),))

    # Cancel while attaching (the base is loaded): stops within a progress tick, frees the model.
    handle = client.submit(job)
    wait_stage(client, handle.job_id, Stage.attaching)
    asked = time.monotonic()
    handle.cancel()
    record = handle.wait(timeout=60)
    assert record.status is JobStatus.cancelled
    assert time.monotonic() - asked < 15  # not the 30 s the stage would take
    info = wait_for(lambda: next(iter(client.workers()), None), 10, "the worker's entry")
    assert info.models == () and info.free_bytes == info.capacity_bytes

    # A per-job timeout, enforced by the worker itself.
    record = client.submit(job.model_copy(update={"timeout_seconds": 3.0})).wait(timeout=60)
    assert record.status is JobStatus.failed and record.error is not None
    assert record.error.type == "TimedOut" and "3s limit" in record.error.message
    assert not client.workers()[0].models

    # A CUDA error that poisons the context: job failed, worker gone from the registry, exit 70.
    poisoned = LoadJob(model=ModelRef(path=str(marked_model(models["llama"], tmp_path, CUDA_MARKER))))
    record = client.submit(poisoned).wait(timeout=60)
    assert record.status is JobStatus.failed and record.error is not None
    assert "CUDA error" in record.error.message and "exits to be restarted" in record.error.message
    assert worker.proc.wait(30) == EXIT_POISONED
    assert "w1" not in registered(client)
