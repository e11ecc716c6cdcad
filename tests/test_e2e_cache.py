"""A pool of CPU workers with small capacities standing in for GPUs: cache hits, routing,
one load per key, detaching, eviction, pinning, keep-alive, InsufficientMemory, the OOM
retry, a killed worker leaving `ls`, memory returning after unload, quantized artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas import AttachAdapterJob, JobStatus, LoadJob, ModelRef, Stage, UnloadJob, WorkerInfo
from tasks.client import Client
from tests.support.models import build_model
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e

TINY = "1000000"  # bytes: two tiny fp32 models fit (about 420 KB each), a third does not


def _load(path: Path, **extra: Any) -> LoadJob:
    return LoadJob(model=ModelRef(path=str(path)), **extra)


def _until(check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not true within {timeout}s")


def _ls(env: dict[str, str]) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "ls", "--json"], check=True,
                         capture_output=True, text=True, env={**os.environ, **env})
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _holder(client: Client, key: str) -> WorkerInfo | None:
    return client.registry.holder(key)


def test_pool_routes_loads_and_attaches_once_per_key(client: Client, pool: WorkerPool,
                                                     models: dict[str, Path]) -> None:
    for name in ("w1", "w2", "w3"):
        pool.start(name, "--capacity", TINY, wait=False)
    for worker in pool:
        pool.wait_registered(worker)

    # one load per key: identical concurrent loads go to one worker and load once
    handles = [client.submit(_load(models["llama"])) for _ in range(3)]
    records = [h.wait(timeout=120) for h in handles]
    assert all(r.status is JobStatus.succeeded for r in records), [r.error for r in records]
    infos = [r.result for r in records if r.result is not None]
    assert len({i.model_key for i in infos}) == 1 and len({i.worker for i in infos}) == 1
    assert sorted(i.cache_hit for i in infos) == [False, True, True]
    first = next(i for i in infos if not i.cache_hit)
    assert first.estimated_bytes is not None
    assert abs(first.estimated_bytes - first.footprint_bytes) <= 0.05 * first.footprint_bytes
    key, holder = first.model_key, first.worker

    # a new load goes to a worker with more free bytes, not the holder
    qwen = client.submit(_load(models["qwen2"])).wait(timeout=120)
    assert qwen.result is not None and qwen.result.worker != holder

    # an attach goes to the holder; a detach takes the adapter off again
    attached = client.submit(AttachAdapterJob(model_key=key, adapter=ModelRef(path=str(models["lora"])),
                                              name="a1")).wait(timeout=120)
    assert attached.status is JobStatus.succeeded, attached.error
    assert attached.worker == holder and attached.result is not None
    assert attached.result.adapters == ("a1",)
    env = {"MODELQ_REDIS_URL": client.settings.redis_url}
    entry = next(w for w in _ls(env) if w["name"] == holder)
    model = next(m for m in entry["models"] if m["model_key"] == key)
    assert model["adapters"] == ["a1"] and model["tenant"] == "default" and model["pinned"] is False
    assert entry["pid"] > 0 and entry["host"] and entry["capacity_bytes"] == int(TINY)
    assert entry["free_bytes"] == int(TINY) - model["bytes"]
    detached = subprocess.run([sys.executable, "-m", "tasks.cli", "detach", key, "a1", "--wait", "--json"],
                              capture_output=True, text=True, env={**os.environ, **env})
    assert detached.returncode == 0, detached.stderr
    assert json.loads(detached.stdout)["result"]["adapters"] == []

    # a SIGKILLed worker leaves `ls` within its TTL (3 s here)
    idle = next(w for w in pool if w.name not in (holder, qwen.result.worker))
    idle.kill()
    _until(lambda: idle.name not in {w["name"] for w in _ls(env)}, timeout=15)


def test_eviction_pinning_keep_alive_insufficient_memory_and_oom_retry(
        client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path) -> None:
    # the first three load attempts fail to allocate: one job fails after its retry, one recovers
    pool.start("solo", "--capacity", TINY, env={"MODELQ_TEST_FAIL_ALLOC": "3"})
    failed = client.submit(_load(models["llama"])).wait(timeout=120)
    assert failed.status is JobStatus.failed and failed.error is not None
    assert failed.error.type == "InsufficientMemory"
    pinned = client.submit(_load(models["llama"], pin=True)).wait(timeout=120)
    assert pinned.status is JobStatus.succeeded and pinned.result is not None, pinned.error
    assert pinned.result.pinned

    qwen = client.submit(_load(models["qwen2"])).wait(timeout=120)
    assert qwen.result is not None
    mistral = client.submit(_load(models["mistral"])).wait(timeout=120)  # needs qwen2's room
    assert mistral.status is JobStatus.succeeded, mistral.error
    resident = {m.model_key for m in client.workers()[0].models}
    assert resident == {pinned.result.model_key, mistral.result.model_key}  # type: ignore[union-attr]

    big = build_model("llama", tmp_path / "big", hidden=256, layers=2, vocab=1024)
    refused = client.submit(_load(big)).wait(timeout=120)
    assert refused.status is JobStatus.failed and refused.error is not None
    assert refused.error.type == "InsufficientMemory"
    assert int(refused.error.details["needed_bytes"]) > int(TINY)
    assert int(refused.error.details["free_bytes"]) >= 0
    assert len(client.workers()[0].models) == 2  # nothing evicted in vain

    short = client.submit(_load(models["qwen2"], keep_alive_seconds=1)).wait(timeout=120)
    assert short.status is JobStatus.succeeded and short.result is not None, short.error
    _until(lambda: short.result.model_key not in {m.model_key for m in client.workers()[0].models},
           timeout=30)
    unloaded = client.submit(UnloadJob(model_key=pinned.result.model_key)).wait(timeout=60)
    assert unloaded.status is JobStatus.succeeded


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_returns_after_unload_and_quantized_artifacts_are_reused(
        client: Client, pool: WorkerPool, tmp_path: Path) -> None:
    artifacts = tmp_path / "home" / "artifacts"  # the default place, under MODELQ_HOME
    base = build_model("llama", tmp_path / "base", hidden=512, layers=4, vocab=4096)  # ~55 MB fp32
    worker = pool.start("mem", "--capacity", "2GiB", env={"MODELQ_HOME": str(artifacts.parent)})

    def cycle(**extra: Any) -> Any:
        loaded = client.submit(_load(base, **extra)).wait(timeout=120)
        assert loaded.status is JobStatus.succeeded and loaded.result is not None, loaded.error
        freed = client.submit(UnloadJob(model_key=loaded.result.model_key)).wait(timeout=60)
        assert freed.status is JobStatus.succeeded
        return loaded.result

    cycle()  # warm-up: allocator arenas, imports
    start = _rss(worker.pid)
    for _ in range(4):
        cycle()
    assert _rss(worker.pid) <= start * 1.05 + 8 * 2**20, (start, _rss(worker.pid))

    first = cycle(quantization="nf4")
    saved = [p for p in artifacts.iterdir() if not p.name.startswith(".")]
    assert len(saved) == 1 and (saved[0] / "model.safetensors").is_file()
    second = cycle(quantization="nf4")
    assert second.from_artifact and not first.from_artifact
    assert second.footprint_bytes == first.footprint_bytes

    build_model("llama", base, hidden=512, layers=4, vocab=4096, seed=9)  # the base changed
    third = cycle(quantization="nf4")
    assert third.base_model.fingerprint != first.base_model.fingerprint and not third.from_artifact
    now = [p for p in artifacts.iterdir() if not p.name.startswith(".")]
    assert len(now) == 1 and now[0] != saved[0]  # a new artifact; the stale one pruned


def test_a_load_the_cache_serves_as_asked_ends_in_one_write(client: Client, pool: WorkerPool,
                                                            models: dict[str, Path]) -> None:
    worker = pool.start("hits")
    first = client.submit(_load(models["llama"])).wait(timeout=120)
    assert first.status is JobStatus.succeeded and first.result is not None
    _until(lambda: _holder(client, first.result.model_key))  # the registry shows it resident
    handle = client.submit(_load(models["llama"]))
    hit = handle.wait(timeout=60)
    assert hit.status is JobStatus.succeeded and hit.result is not None and hit.result.cache_hit
    assert (hit.worker, hit.attempt, hit.result.model_key) == ("hits", 1, first.result.model_key)
    assert hit.started_at is not None and hit.finished_at is not None
    events = [(e.status, e.stage, e.message) for e in handle.events(timeout=5)]
    assert events == [(JobStatus.queued, None, "submitted"),
                      (JobStatus.running, Stage.resolving,
                       f"started on hits: resolving {models['llama']}"),
                      (JobStatus.succeeded, Stage.resolving, "done")]  # as a full run shows it
    # the worker logs the hit just after its one write: give the line a moment to land
    _until(lambda: f"job {handle.job_id}: load served from the cache on hits" in worker.log_text(), 10)
    # a hit that changes the entry (pin it) runs in full, and the entry says so after
    pinned = client.submit(_load(models["llama"], pin=True)).wait(timeout=60)
    assert pinned.result is not None and pinned.result.cache_hit and pinned.result.pinned
    assert _holder(client, first.result.model_key) is not None
