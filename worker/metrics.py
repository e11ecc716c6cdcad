"""A worker's Prometheus metrics: a run observer plus values read at scrape time.

Counters and the load-duration histogram move when the runner reports a job's end
(`Metrics.job_ended`); resident bytes and queue depth are read when Prometheus
scrapes, so they are never stale. No metric calls live in the runner or the service;
the cache reports evictions through `Metrics.evicted`. Nothing here raises into a job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas import JobKind, JobRecord, JobStatus, ModelInfo
from tasks.state.keys import queue_list

log = logging.getLogger(__name__)

LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Live(Collector):
    """Gauges computed at scrape time: resident bytes and models, capacity, queue depth."""

    def __init__(self, device: str, resident: Callable[[], list[int]], capacity: Callable[[], int],
                 client: redis.Redis, queues: list[str], dead_letters: str | None = None) -> None:
        self.device = device
        self.dead_letters = dead_letters
        self.resident = resident
        self.capacity = capacity
        self.redis = client
        self.queues = queues

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # no Redis call when registering

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sizes = self.resident()
        for name, doc, value in (
            ("modelq_resident_bytes", "Bytes of models resident on the device", sum(sizes)),
            ("modelq_resident_models", "Models resident on the device", len(sizes)),
            ("modelq_capacity_bytes", "Bytes this worker may fill on the device", self.capacity()),
        ):
            family = GaugeMetricFamily(name, doc, labels=["device"])
            family.add_metric([self.device], value)
            yield family
        depth = GaugeMetricFamily("modelq_queue_depth", "Jobs waiting in a queue this worker consumes",
                                  labels=["queue"])
        dead = GaugeMetricFamily("modelq_dead_letters",
                                 "Queue messages no worker could decode, moved aside (dead-letter list)")
        try:
            for queue in self.queues:
                depth.add_metric([queue], self.redis.llen(queue_list(queue)))
            if self.dead_letters is not None:
                dead.add_metric([], self.redis.llen(self.dead_letters))
        except redis.RedisError as exc:
            log.warning("metrics: cannot read queue depth: %s", exc)
            return
        yield depth
        if self.dead_letters is not None:
            yield dead


class Metrics:
    """One worker's metrics in their own registry; a RunObserver for the runner."""

    def __init__(self, *, device: str, resident: Callable[[], list[int]], capacity: Callable[[], int],
                 client: redis.Redis, queues: list[str], dead_letters: str | None = None) -> None:
        self.device = device
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("modelq_jobs", "Jobs that ended, by kind and status",
                            ["kind", "status"], registry=self.registry)
        self.load_seconds = Histogram("modelq_load_duration_seconds",
                                      "Time to load a model that was not cached, by quantization",
                                      ["quantization"], buckets=LOAD_BUCKETS, registry=self.registry)
        self.bytes_loaded = Counter("modelq_loaded_bytes", "Bytes of models loaded onto the device",
                                    ["device"], registry=self.registry)
        self.cache_hits = Counter("modelq_cache_hits", "Load jobs answered from the model cache",
                                  registry=self.registry)
        self.cache_misses = Counter("modelq_cache_misses", "Load jobs that had to load the model",
                                    registry=self.registry)
        self.evictions = Counter("modelq_cache_evictions", "Models evicted to make room",
                                 ["device"], registry=self.registry)
        self.dead_lettered = Counter("modelq_dead_lettered",
                                     "Queue messages this worker could not decode and moved to "
                                     "the dead-letter list", registry=self.registry)
        self.batch_jobs = Histogram("modelq_batch_jobs",
                                    "Run jobs that shared one call of a batchable task (1: alone)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        for kind in JobKind:
            for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
                self.jobs.labels(kind.value, status.value)  # zeros are series too
        self.bytes_loaded.labels(device)
        self.evictions.labels(device)
        self.registry.register(_Live(device, resident, capacity, client, queues, dead_letters))

    # --- RunObserver -----------------------------------------------------------------

    def job_started(self, record: JobRecord) -> None:
        pass

    def job_ended(self, record: JobRecord) -> None:
        try:
            self._count(record)
        except Exception:  # metrics never fail a job
            log.exception("metrics: could not count job %s", record.job_id)

    def _count(self, record: JobRecord) -> None:
        self.jobs.labels(record.kind.value, record.status.value).inc()
        info = record.result
        if record.kind is not JobKind.load or not isinstance(info, ModelInfo):
            return
        if info.cache_hit:
            self.cache_hits.inc()
            return
        self.cache_misses.inc()
        self.bytes_loaded.labels(self.device).inc(info.footprint_bytes)
        if info.load_seconds is not None:
            self.load_seconds.labels(info.quantization).observe(info.load_seconds)

    def batch_ran(self, size: int) -> None:
        """A batch of run jobs ran (worker/jobs/batching.py): `size` jobs shared its largest call."""
        self.batch_jobs.observe(size)

    # --- the cache ---------------------------------------------------------------------

    def evicted(self, count: int = 1) -> None:
        self.evictions.labels(self.device).inc(count)

    # --- the transport (worker/recovery/quarantine.py) --------------------------------------------

    def moved_aside(self) -> None:
        self.dead_lettered.inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on `port` from a daemon thread."""
        server = start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)
        return server
