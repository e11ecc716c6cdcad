"""Fairness at scale: the cache-hit round trip on a worker with 1 tenant against one with 200.

Starts its own redis-server and two real `modelq worker` processes on it, each under a
key prefix of its own (so each is its own pool on the one Redis, with its own queues
and registry): one with a tenants file of 1 tenant, one with `tenants` tenants, every
tenant of priority `priority`. Each worker loads one tiny model once; then the same load
is submitted and waited for (`Client.submit(job).wait()`, a cache hit) `jobs` times on
each side, as one tenant, the two sides taking turns in `rounds` rounds so that the
machine's noise falls on both alike.

`tenant_queue_ratio` is the p50 round trip with many tenants over the p50 with one
(issue 14's target: at most 1.25). How many queues each worker consumes is reported too.

    python -m bench.tenant_queues [--jobs 200] [--tenants 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench.env import WORKER_ENV
from bench.figures import percentile
from schemas import JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tasks.settings import Settings
from tests.support.models import build_model
from tests.support.redis_server import RedisServer
from tests.support.tenancy import write_tenants
from tests.support.workers import WorkerPool

log = logging.getLogger(__name__)


def _tenants_file(path: Path, count: int, priority: int, root: Path) -> Path:
    return write_tenants(path, {f"t{i:03d}": {"key": f"tenant-key-{i:03d}-0123456789",
                                              "roots": [str(root)], "priority": priority}
                                for i in range(count)})


def _side(server: RedisServer, root: Path, count: int, priority: int,
          pools: list[WorkerPool]) -> tuple[Client, LoadJob]:
    """Start a worker of `count` tenants under its own prefix (its pool added to `pools`);
    its client (tenant t000) and job, the model loaded."""
    prefix = f"tq{count}"
    tenants = _tenants_file(root / f"{prefix}.toml", count, priority, root)
    pool = WorkerPool(server.url, root, key_prefix=prefix,
                      env={**WORKER_ENV, "MODELQ_KEY_PREFIX": prefix,
                           "MODELQ_TENANTS_FILE": str(tenants)})
    pools.append(pool)
    pool.start(prefix, timeout=180)
    settings = Settings(redis_url=server.url, key_prefix=prefix, tenant="t000",
                        tenant_key=SecretStr("tenant-key-000-0123456789"))
    job = LoadJob(model=ModelRef(path=str(root / "llama")), tenant="t000")
    client = Client(settings)
    _trip(client, job, warm=True)
    return client, job


def _trip(client: Client, job: LoadJob, warm: bool = False) -> float:
    started = time.perf_counter()
    record = client.submit(job).wait(timeout=120)
    elapsed = time.perf_counter() - started
    if record.status is not JobStatus.succeeded or record.result is None \
            or not (warm or record.result.cache_hit):
        raise RuntimeError(f"expected a {'load' if warm else 'cache hit'}, got "
                           f"{record.status}: {record.error}")
    return elapsed


def _queues(client: Client) -> int:
    """How many queues the side's worker consumes, as `celery inspect active_queues` says."""
    replies = client.app.control.inspect(timeout=5, limit=1).active_queues() or {}
    return sum(len(queues) for queues in replies.values())


def measure(jobs: int = 200, tenants: int = 200, priority: int = 2,
            rounds: int = 5) -> dict[str, Any]:
    """Cache-hit round trips (seconds) with 1 tenant and with `tenants`, each of `priority`.

    Returns {"tenant_queue_ratio": p50 many / p50 one, "one": {...}, "many": {...}} where
    each side has p50_s, p99_s, jobs, tenants and queues (the queues its worker consumes).
    """
    with tempfile.TemporaryDirectory(prefix="modelq-tenant-queues-") as tmp, \
            RedisServer() as server:
        root = Path(tmp)
        build_model("llama", root / "llama")
        pools: list[WorkerPool] = []
        try:
            sides = {"one": _side(server, root, 1, priority, pools),
                     "many": _side(server, root, tenants, priority, pools)}
            times: dict[str, list[float]] = {name: [] for name in sides}
            per_round = max(1, jobs // rounds)
            for _ in range(rounds):
                for name, (client, job) in sides.items():
                    times[name] += [_trip(client, job) for _ in range(per_round)]
            out: dict[str, Any] = {
                name: {"tenants": 1 if name == "one" else tenants, "priority": priority,
                       "jobs": len(times[name]), "queues": _queues(sides[name][0]),
                       "p50_s": percentile(times[name], 50), "p99_s": percentile(times[name], 99)}
                for name in sides}
            out["tenant_queue_ratio"] = out["many"]["p50_s"] / out["one"]["p50_s"]
            return out
        finally:
            for pool in pools:
                pool.stop_all()


def table(result: dict[str, Any]) -> str:
    lines = [f"{'side':<6}{'tenants':>8}{'queues':>8}{'jobs':>6}{'p50 ms':>9}{'p99 ms':>9}"]
    for name in ("one", "many"):
        s = result[name]
        lines.append(f"{name:<6}{s['tenants']:>8}{s['queues']:>8}{s['jobs']:>6}"
                     f"{s['p50_s'] * 1000:>9.2f}{s['p99_s'] * 1000:>9.2f}")
    lines.append(f"tenant_queue_ratio {result['tenant_queue_ratio']:.3f} (target <= 1.25)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tenant_queues", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="cache hits per side (default 200)")
    parser.add_argument("--tenants", type=int, default=200, help="tenants on the many side")
    parser.add_argument("--priority", type=int, default=2, help="every tenant's priority")
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    result = measure(jobs=args.jobs, tenants=args.tenants, priority=args.priority)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
