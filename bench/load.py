"""Load: many jobs from many tenants against several real workers; none lost, none doubled.

`python -m bench.load [JOBS]` starts its own redis-server and 3 `modelq worker`
processes, builds tiny models, submits JOBS load jobs (default 1,000) from 10 tenants
over 3 models x 2 dtypes (a few real loads per worker, the rest cache hits), waits
for all of them and prints throughput and p50/p99 latency (submit to terminal record)
as JSON. `drive()` is the part tests/test_reliability_load.py reuses with a small count.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas import JobStatus, LoadJob, ModelRef
from tasks.client import Client, JobHandle


def drive(client: Client, models: list[Path], jobs: int, tenants: int = 10,
          timeout: float = 600) -> dict[str, Any]:
    """Submit `jobs` loads round-robin over tenants/models/dtypes; wait; check and measure."""
    dtypes = ("auto", "bfloat16")
    started = time.monotonic()
    handles: list[JobHandle] = []
    for i in range(jobs):
        job = LoadJob(model=ModelRef(path=str(models[i % len(models)])),
                      dtype=dtypes[(i // len(models)) % len(dtypes)], tenant=f"tenant-{i % tenants}")
        handles.append(client.submit(job))
    submitted = time.monotonic() - started
    deadline = started + timeout
    records = [h.wait(timeout=max(1.0, deadline - time.monotonic())) for h in handles]
    elapsed = time.monotonic() - started

    failed = [r for r in records if r.status is not JobStatus.succeeded]
    doubled = [r.job_id for r in records
               if r.attempt != 1 or sum(1 for _, e in client.store.events(r.job_id)
                                        if e.message and "started on" in e.message) != 1]
    latencies = sorted((r.finished_at - r.created_at).total_seconds() for r in records
                       if r.finished_at is not None)
    hits = sum(1 for r in records if r.result is not None and r.result.cache_hit)
    return {
        "jobs": jobs, "tenants": tenants, "workers": len(client.workers()),
        "succeeded": jobs - len(failed), "failed": len(failed), "lost": jobs - len(records),
        "doubled": len(doubled), "cache_hits": hits, "loads": jobs - hits - len(failed),
        "submit_seconds": round(submitted, 2), "seconds": round(elapsed, 2),
        "jobs_per_second": round(jobs / elapsed, 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "errors": sorted({f"{r.error.type}: {r.error.message}" for r in failed if r.error})[:5],
    }


def run(jobs: int = 1000, workers: int = 3) -> dict[str, Any]:
    from tasks.settings import Settings
    from tests.support.models import build_model
    from tests.support.redis_server import RedisServer
    from tests.support.workers import WorkerPool

    root = Path(tempfile.mkdtemp(prefix="modelq-bench-load-"))
    models = [build_model("llama", root / "llama"), build_model("qwen2", root / "qwen2", seed=1),
              build_model("mistral", root / "mistral", seed=2)]
    with RedisServer() as server:
        pool = WorkerPool(server.url, root)
        try:
            started = [pool.start(f"load-w{i}", wait=False) for i in range(workers)]
            for worker in started:
                pool.wait_registered(worker, timeout=300)
            return drive(Client(Settings(redis_url=server.url)), models, jobs)
        finally:
            pool.stop_all()


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1000), indent=2))
