"""Queue overhead: cache-hit load jobs through modelq against raw Celery no-ops, side by side.

Both run on the same Redis with the same number of solo-pool workers, their
rounds interleaved so that the shared machine's noise falls on both alike.
The round trip is submit to finished record (modelq: the record the client's
`wait` returns; Celery: the stored result `get` returns).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from bench import raw_celery
from bench.env import Bench
from bench.figures import percentile
from schemas import JobStatus, LoadJob, ModelRef

log = logging.getLogger(__name__)


class RoundTrips:
    """Times one job at a time, and batches, through both systems."""

    def __init__(self, bench: Bench, model: Path) -> None:
        self.bench = bench
        self.job = LoadJob(model=ModelRef(path=str(model)))
        self.payload = {"job": self.job.model_dump(mode="json")}  # the same bytes on the wire
        self.raw = raw_celery.create_app(bench.redis.url)

    def warm(self, workers: int, attempts: int = 12) -> set[str]:
        """Load the model on every worker (loads go to any worker); the workers that hold it."""
        holders: set[str] = set()
        for _ in range(attempts):
            handles = [self.bench.client.submit(self.job) for _ in range(workers)]
            records = [handle.wait(timeout=120) for handle in handles]
            if any(r.status is not JobStatus.succeeded or r.result is None for r in records):
                raise RuntimeError(f"warm-up load failed: {[r.error for r in records]}")
            key = records[0].result.model_key  # type: ignore[union-attr]
            deadline = time.monotonic() + 3  # the registry is republished just after the record
            while time.monotonic() < deadline:
                holders = {w.name for w in self.bench.client.workers()
                           if any(m.model_key == key for m in w.models)}
                if len(holders) >= workers or holders >= {r.worker for r in records}:
                    break
                time.sleep(0.02)
            if len(holders) >= workers:
                break
        for _ in range(3):
            self.raw_once()
        return holders

    def modelq_once(self) -> float:
        started = time.perf_counter()
        record = self.bench.client.submit(self.job).wait(timeout=60)
        elapsed = time.perf_counter() - started
        if record.status is not JobStatus.succeeded or record.result is None \
                or not record.result.cache_hit:
            raise RuntimeError(f"expected a cache hit, got {record.status}: {record.error}")
        return elapsed

    def raw_once(self) -> float:
        started = time.perf_counter()
        self.raw.send_task(raw_celery.TASK, args=[self.payload], queue=raw_celery.QUEUE).get(timeout=60)
        return time.perf_counter() - started

    def modelq_batch(self, count: int) -> tuple[float, set[str]]:
        """Jobs per second for `count` jobs submitted at once; the workers that ran them."""
        started = time.perf_counter()
        handles = [self.bench.client.submit(self.job) for _ in range(count)]
        workers = set()
        for handle in handles:
            record = handle.wait(timeout=120)
            if record.status is not JobStatus.succeeded:
                raise RuntimeError(f"batch job failed: {record.error}")
            workers.add(record.worker or "?")
        return count / (time.perf_counter() - started), workers

    def raw_batch(self, count: int) -> float:
        started = time.perf_counter()
        results = [self.raw.send_task(raw_celery.TASK, args=[self.payload], queue=raw_celery.QUEUE)
                   for _ in range(count)]
        for result in results:
            result.get(timeout=120)
        return count / (time.perf_counter() - started)


def measure(trips: RoundTrips, *, latency_rounds: int, jobs_per_round: int, batches: int,
            batch_size: int) -> dict[str, Any]:
    """Latency ratios (p50 per round) and throughput ratios (per batch pair), interleaved."""
    latency: list[float] = []
    raw_p50: list[float] = []
    modelq_p50: list[float] = []
    for _ in range(latency_rounds):
        raw, ours = [], []
        for _ in range(jobs_per_round):
            raw.append(trips.raw_once())
            ours.append(trips.modelq_once())
        raw_p50.append(percentile(raw, 50))
        modelq_p50.append(percentile(ours, 50))
        latency.append(modelq_p50[-1] / raw_p50[-1])
    throughput: list[float] = []
    raw_rates: list[float] = []
    modelq_rates: list[float] = []
    served: set[str] = set()
    for _ in range(batches):
        raw_rates.append(trips.raw_batch(batch_size))
        rate, workers = trips.modelq_batch(batch_size)
        modelq_rates.append(rate)
        served |= workers
        throughput.append(rate / raw_rates[-1])
    return {"latency_ratios": latency, "raw_p50_s": raw_p50, "modelq_p50_s": modelq_p50,
            "throughput_ratios": throughput, "raw_jobs_per_s": raw_rates,
            "modelq_jobs_per_s": modelq_rates, "modelq_workers_used": sorted(served)}
