"""Load, small: 60 jobs from 10 tenants against 3 real workers; all complete, none lost or doubled.

The full 1,000-job run, with throughput and latency, is `python -m bench.load`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import drive
from tasks.client import Client
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_sixty_jobs_ten_tenants_three_workers(client: Client, pool: WorkerPool,
                                              models: dict[str, Path]) -> None:
    workers = [pool.start(f"w{i}", wait=False) for i in range(3)]
    for worker in workers:
        pool.wait_registered(worker, timeout=180)
    report = drive(client, [models["llama"], models["qwen2"], models["mistral"]], jobs=60, timeout=240)
    assert report["succeeded"] == 60, report["errors"]
    assert report["lost"] == 0 and report["doubled"] == 0
    assert report["cache_hits"] > 0 and report["loads"] > 0
    assert all(w.alive() for w in workers)
