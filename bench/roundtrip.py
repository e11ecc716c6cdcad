"""Queue overhead: cache-hit load jobs through modelq against raw Celery no-ops, side by side.

Both run on the same Redis with the same number of solo-pool workers, their
rounds interleaved so that the shared machine's noise falls on both alike.
The round trip is submit to finished record (modelq: the record the client's
`wait` returns; Celery: the stored result `get` returns).

Each modelq worker holds a model of its own (a variant folder per worker, placed by
routing on the worker with the most free bytes), and the cache-hit jobs go round
robin over those models: a pool serving several resident models, so that the same
number of workers serve both sides. One model would pin every cache hit to its one
holder, which is what routing is for, not what the throughput ratio compares.
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

    def __init__(self, bench: Bench, models: list[Path]) -> None:
        self.bench = bench
        self.jobs = [LoadJob(model=ModelRef(path=str(model))) for model in models]
        self.job = self.jobs[0]
        self.payload = {"job": self.job.model_dump(mode="json")}  # the same bytes on the wire
        self.raw = raw_celery.create_app(bench.redis.url)
        self._turn = 0

    def next_job(self) -> LoadJob:
        self._turn += 1
        return self.jobs[self._turn % len(self.jobs)]

    def warm(self) -> set[str]:
        """Load each model once (routing puts each on the worker with most free bytes); holders."""
        holders: set[str] = set()
        for job in self.jobs:
            record = self.bench.client.submit(job).wait(timeout=120)
            if record.status is not JobStatus.succeeded or record.result is None:
                raise RuntimeError(f"warm-up load failed: {record.error}")
            holders.add(record.worker or "?")
        for _ in range(3):
            self.raw_once()
        return holders

    def modelq_once(self) -> float:
        started = time.perf_counter()
        record = self.bench.client.submit(self.next_job()).wait(timeout=60)
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
        handles = [self.bench.client.submit(self.next_job()) for _ in range(count)]
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
