"""What Celery's monitoring costs a worker: cache-hit round trips with remote control off, on,
and on with task events (`-E`).

One worker at a time on a redis-server of its own; it loads a tiny model once, then the
Client submits `--jobs` sequential loads of it (cache hits: the cheapest job, so the
queue's own cost shows) and waits for each. Modes alternate over `--rounds` rounds so the
shared machine's noise falls on all alike.

    python -m bench.remote_control [--jobs 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from schemas import JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tasks.settings import Settings
from tests.support.models import build_model
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool

MODES = {
    "remote control off": ({"MODELQ_REMOTE_CONTROL": "0"}, ()),
    "remote control on": ({"MODELQ_REMOTE_CONTROL": "1"}, ()),
    "remote control on, -E": ({"MODELQ_REMOTE_CONTROL": "1"}, ("-E",)),
}


def round_trips(client: Client, model: Path, jobs: int) -> list[float]:
    """Seconds from submit to the finished record, for `jobs` sequential cache-hit loads."""
    job = LoadJob(model=ModelRef(path=str(model)))
    first = client.submit(job).wait(timeout=120)
    assert first.status is JobStatus.succeeded, first.error
    times = []
    for _ in range(jobs):
        started = time.perf_counter()
        record = client.submit(job).wait(timeout=60)
        times.append(time.perf_counter() - started)
        assert record.result is not None and record.result.cache_hit, record.error
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        model = build_model("llama", Path(tmp) / "llama")
        client = Client(Settings(redis_url=server.url))
        for round_ in range(args.rounds):
            for i, (mode, (env, flags)) in enumerate(MODES.items()):
                pool = WorkerPool(server.url, Path(tmp), env={"OMP_NUM_THREADS": "1", **env})
                try:
                    pool.start(f"w{round_}{i}", *flags)
                    results[mode] += round_trips(client, model, args.jobs)
                finally:
                    pool.stop_all()
    print(f"{args.jobs} sequential cache-hit loads x {args.rounds} rounds, one worker:")
    for mode, times in results.items():
        print(f"  {mode:<24} median {statistics.median(times) * 1000:6.1f} ms  "
              f"p95 {statistics.quantiles(times, n=20)[-1] * 1000:6.1f} ms  "
              f"{len(times) / sum(times):6.1f} jobs/s")


if __name__ == "__main__":
    main()
