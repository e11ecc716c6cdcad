"""Faults, repeated: what each one costs in lost or doubled jobs (the answer must be none).

`python -m bench.reliability` starts its own redis-server and real `modelq worker` processes
with the test hooks of worker/fault_hooks.py, and repeats each fault:

- kill9:     `kill -9` of the worker mid-load (20 times); the job must complete on
             another worker as attempt 2, leaving exactly one resident copy;
- crashloop: a job that kills every worker it lands on; it must fail as WorkerLost
             after max_attempts (3) while the jobs behind it complete;
- sigterm:   SIGTERM mid-load; the job must succeed, the worker exit 0 and leave the registry;
- redis:     `kill -9` of Redis (AOF on) with jobs running and queued, then a restart;
             every job must complete;
- poison:    an injected CUDA error; the job fails, the worker exits 70 and leaves the registry.

Prints one JSON object; `run()` returns it. The README's reliability table comes from it.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas import JobStatus, LoadJob, ModelInfo, ModelNotFound, ModelRef, Stage, UnloadJob
from tasks.client import Client
from tasks.settings import Settings
from tests.support.fault_waits import (
    fault_env,
    marked_model,
    resident_copies,
    started_events,
    wait_for,
    wait_stage,
)
from tests.support.models import build_model
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool, WorkerProcess
from worker.app import EXIT_POISONED
from worker.fault_hooks import CUDA_MARKER, KILL_MARKER


class Fleet:
    """`size` live workers on one Redis; dead ones are replaced as a supervisor would."""

    def __init__(self, pool: WorkerPool, size: int, env: dict[str, str]) -> None:
        self.pool, self.env, self.count = pool, env, 0
        self.live = [self._start() for _ in range(size)]
        for worker in self.live:
            pool.wait_registered(worker, timeout=300)

    def _start(self) -> WorkerProcess:
        self.count += 1
        return self.pool.start(f"f{self.count}", env=self.env, wait=False)

    def named(self, name: str | None) -> WorkerProcess:
        return next(w for w in self.live if w.name == name)

    def replace_dead(self) -> int:
        dead = [w for w in self.live if not w.alive()]
        for worker in dead:
            self.live.remove(worker)
            self.live.append(self._start())
        return len(dead)


def scenario(name: str, root: Path, size: int, env: dict[str, str], body: Callable[..., dict[str, Any]],
             *, appendonly: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    with RedisServer(appendonly=appendonly, appendfsync="always", data_dir=root / f"redis-{name}") as server:
        pool = WorkerPool(server.url, root)
        try:
            client = Client(Settings(redis_url=server.url, connect_timeout_seconds=2))
            result = body(client, Fleet(pool, size, env), server)
        finally:
            pool.stop_all()
    return {**result, "seconds": round(time.monotonic() - started, 1)}


def unload(client: Client, result: ModelInfo | None) -> None:
    """Free a model so the next rep loads it again (gone already if its worker died)."""
    if result is not None:
        try:
            client.submit(UnloadJob(model_key=result.model_key)).wait(60)
        except ModelNotFound:
            pass


def kill9(models: list[Path], reps: int) -> Callable[..., dict[str, Any]]:
    def body(client: Client, fleet: Fleet, _server: RedisServer) -> dict[str, Any]:
        ok = lost = doubled = 0
        for i in range(reps):
            handle = client.submit(LoadJob(model=ModelRef(path=str(models[i % len(models)]))))
            fleet.named(wait_stage(client, handle.job_id, Stage.loading).worker).proc.kill()
            fleet.replace_dead()
            record = handle.wait(180)
            if record.status is not JobStatus.succeeded or record.result is None:
                lost += 1
                continue
            key = record.result.model_key
            copies = wait_for(lambda key=key: resident_copies(client, key) or None, 30,
                              "a resident copy")
            doubled += copies != 1 or len(started_events(client, handle.job_id)) != 2
            ok += record.attempt == 2
            unload(client, record.result)  # the next rep loads it afresh
        return {"tries": reps, "redelivered_and_completed": ok, "lost": lost, "doubled": doubled}
    return body


def crashloop(models: list[Path], root: Path, reps: int) -> Callable[..., dict[str, Any]]:
    bad = ModelRef(path=str(marked_model(models[0], root, KILL_MARKER)))

    def body(client: Client, fleet: Fleet, _server: RedisServer) -> dict[str, Any]:
        stopped = lost = deaths = 0
        for i in range(reps):
            handle = client.submit(LoadJob(model=bad))
            good = [client.submit(LoadJob(model=ModelRef(path=str(m)), dtype=("bfloat16", "float16")[i % 2]))
                    for m in models[1:]]
            deadline = time.monotonic() + 300
            while not handle.status().terminal and time.monotonic() < deadline:
                deaths += fleet.replace_dead()
                time.sleep(0.2)
            record = handle.status()
            stopped += record.status is JobStatus.failed and record.error is not None \
                and record.error.type == "WorkerLost" and record.attempt == 3
            lost += sum(h.wait(180).status is not JobStatus.succeeded for h in good)
            for h in good:
                unload(client, h.status().result)
        return {"tries": reps, "stopped_as_worker_lost": stopped, "workers_killed": deaths,
                "other_jobs_lost": lost}
    return body


def sigterm(models: list[Path], reps: int) -> Callable[..., dict[str, Any]]:
    def body(client: Client, fleet: Fleet, _server: RedisServer) -> dict[str, Any]:
        ok = clean_exits = left = 0
        for i in range(reps):
            model = ModelRef(path=str(models[i % len(models)]))
            handle = client.submit(LoadJob(model=model, dtype="float16"))
            worker = fleet.named(wait_stage(client, handle.job_id, Stage.loading).worker)
            worker.proc.send_signal(signal.SIGTERM)
            clean_exits += worker.proc.wait(120) == 0
            left += worker.name not in {w.name for w in client.workers()}
            fleet.replace_dead()
            record = handle.wait(180)
            ok += record.status is JobStatus.succeeded
            unload(client, record.result)
        return {"tries": reps, "completed": ok, "exit_0": clean_exits, "left_registry": left,
                "failed": reps - ok}
    return body


def redis_restart(models: list[Path], reps: int) -> Callable[..., dict[str, Any]]:
    def body(client: Client, fleet: Fleet, server: RedisServer) -> dict[str, Any]:
        jobs = ok = doubled = 0
        for _ in range(reps):
            handles = [client.submit(LoadJob(model=ModelRef(path=str(m)), dtype=d))
                       for m in models for d in ("float16", "bfloat16")]
            jobs += len(handles)
            wait_stage(client, handles[0].job_id, Stage.loading)
            server.kill()
            time.sleep(2)  # the outage
            server.start()
            records = [h.wait(300) for h in handles]
            ok += sum(r.status is JobStatus.succeeded for r in records)
            doubled += sum(len(started_events(client, r.job_id)) > r.attempt for r in records)
            for result in {r.result.model_key: r.result for r in records if r.result is not None}.values():
                unload(client, result)
        return {"tries": reps, "jobs": jobs, "completed": ok, "lost": jobs - ok, "doubled": doubled,
                "workers_alive": sum(w.alive() for w in fleet.live)}
    return body


def poison(models: list[Path], root: Path, reps: int) -> Callable[..., dict[str, Any]]:
    bad = ModelRef(path=str(marked_model(models[0], root, CUDA_MARKER)))

    def body(client: Client, fleet: Fleet, _server: RedisServer) -> dict[str, Any]:
        failed = exited = left = 0
        for _ in range(reps):
            record = client.submit(LoadJob(model=bad)).wait(120)
            failed += record.status is JobStatus.failed
            worker = fleet.named(record.worker)
            exited += worker.proc.wait(60) == EXIT_POISONED
            left += worker.name not in {w.name for w in client.workers()}
            fleet.replace_dead()
            fleet.pool.wait_registered(fleet.live[-1], timeout=300)
        return {"tries": reps, "failed_job": failed, "exit_70": exited, "left_registry": left}
    return body


def run(kill_reps: int = 20, crash_reps: int = 2, term_reps: int = 5, redis_reps: int = 3,
        poison_reps: int = 3) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="modelq-bench-faults-"))
    models = [build_model("llama", root / "llama"), build_model("qwen2", root / "qwen2", seed=1),
              build_model("mistral", root / "mistral", seed=2)]
    return {
        "kill9": scenario("kill9", root, 2, fault_env("loading:2"), kill9(models, kill_reps)),
        "crashloop": scenario("crashloop", root, 2, fault_env(), crashloop(models, root, crash_reps)),
        "sigterm": scenario("sigterm", root, 2, fault_env("loading:3"), sigterm(models, term_reps)),
        "redis": scenario("redis", root, 2, fault_env("loading:1"), redis_restart(models, redis_reps),
                          appendonly=True),
        "poison": scenario("poison", root, 1, fault_env(), poison(models, root, poison_reps)),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
