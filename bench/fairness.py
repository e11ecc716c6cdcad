"""Fair scheduling between tenants: how long a small tenant's jobs wait behind another's flood.

Runs a real redis-server and one real `modelq worker` with a tenants file. A `flood` tenant
submits FLOOD load jobs (cache hits of one tiny model after the first) and then a `small`
tenant submits SMALL, all queued before the worker starts. Reports the small tenant's worst
wait (from the first job's start to its own start) and its last start position, in three runs:
alone, behind the flood with per-tenant queues (modelq's scheduling), and behind the same
flood in one FIFO queue (what a single shared queue would do: no tenants file).

    python -m bench.fairness [FLOOD] [SMALL]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from schemas import LoadJob
from tasks.client import Client
from tasks.settings import Settings
from tasks.tenants import load_tenants, publish_limits
from tests.support.models import build_model
from tests.support.redis_server import RedisServer
from tests.support.tenancy import write_tenants
from tests.support.workers import WorkerPool

KEYS = {"flood": "flood-key-0123456789abcdef", "small": "small-key-0123456789abcdef"}


def _run_once(root: Path, name: str, flood: int, small: int, *,
              tenants: bool) -> dict[str, float]:
    model = root / "flood" / "llama"
    logs = root / name
    logs.mkdir()
    with RedisServer() as server:
        settings = Settings(redis_url=server.url, heartbeat_seconds=0.5, worker_ttl_seconds=3)
        env: dict[str, str] = {}
        if tenants:
            path = write_tenants(logs / "tenants.toml", {
                name: {"key": key, "roots": [str(root)]} for name, key in KEYS.items()})
            env["MODELQ_TENANTS_FILE"] = str(path)
        pool = WorkerPool(server.url, logs, env=env)
        try:
            clients = {name: Client(settings.model_copy(update={
                "tenant": name, "tenant_key": SecretStr(key)})) if tenants else Client(settings)
                for name, key in KEYS.items()}
            if tenants:  # what the worker does at start, so that the queues are chosen now
                publish_limits(clients["flood"].redis, clients["flood"].keys, load_tenants(path))
            flooded = [clients["flood"].submit(LoadJob(model=str(model), tenant="flood"))
                       for _ in range(flood)]
            handles = [clients["small"].submit(LoadJob(model=str(model), tenant="small"))
                       for _ in range(small)]
            pool.start("bench")  # everything is queued: the flood first, then the small jobs
            smalls = [h.wait(timeout=1800) for h in handles]
            floods = [h.wait(timeout=1800) for h in flooded]
            first = min(r.started_at for r in smalls + floods if r.started_at is not None)
            waits = [(r.started_at - first).total_seconds() for r in smalls
                     if r.started_at is not None]
            order = sorted(smalls + floods, key=lambda r: r.started_at or first)
            last = max(r.finished_at for r in smalls + floods if r.finished_at is not None)
            return {"small_worst_wait_s": round(max(waits), 3),
                    "small_mean_wait_s": round(sum(waits) / len(waits), 3),
                    "small_last_start_position": max(i for i, r in enumerate(order)
                                                     if r.tenant == "small"),
                    "all_jobs_s": round((last - first).total_seconds(), 3)}
        finally:
            pool.stop_all()


def run(flood: int = 500, small: int = 5) -> dict[str, Any]:
    """The small tenant's waits alone, behind a flood with tenant queues, and in one FIFO queue."""
    with tempfile.TemporaryDirectory(prefix="modelq-fairness-") as tmp:
        root = Path(tmp)
        build_model("llama", root / "flood" / "llama")
        return {"flood_jobs": flood, "small_jobs": small,
                "alone": _run_once(root, "alone", 0, small, tenants=True),
                "flood_fair": _run_once(root, "fair", flood, small, tenants=True),
                "flood_fifo": _run_once(root, "fifo", flood, small, tenants=False)}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(run(*args), indent=2))
