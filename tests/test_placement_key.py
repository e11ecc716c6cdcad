"""Placements that put a model in the same place share one resident copy (a fuzz run once left
151 copies of one model resident, one per max_memory value)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob
from tasks.client import Client
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e


def test_max_memory_that_places_nothing_makes_no_new_copy(client: Client, pool: WorkerPool,
                                                          models: dict[str, Path]) -> None:
    pool.start("onecopy")  # default settings, a cpu worker
    path = str(models["llama"])
    placements = [{"max_memory": {"cpu": "1GiB"}}, {"max_memory": {"cpu": "2GiB"}}, {},
                  {"device_map": "cpu", "max_memory": {"cpu": "3GiB"}}]
    records = [client.submit(LoadJob.model_validate({"model": path, "placement": p})).wait(timeout=120)
               for p in placements]
    assert all(r.status is JobStatus.succeeded for r in records), [r.error for r in records]
    keys = {r.result.model_key for r in records if r.result is not None}
    assert len(keys) == 1, keys
    assert [r.result.cache_hit for r in records if r.result is not None] == [False, True, True, True]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the registry shows what the heartbeat last published
        resident = [m.model_key for w in client.workers() for m in w.models]
        if resident == list(keys):
            break
        time.sleep(0.2)
    assert resident == list(keys)


def test_a_strategy_whose_budgets_place_alike_makes_no_new_copy(client: Client, pool: WorkerPool,
                                                                 models: dict[str, Path]) -> None:
    """'auto' is resolved to its map before loading: two generous cpu budgets are one map."""
    pool.start("onestrategy")  # default settings, a cpu worker
    path = str(models["llama"])
    placements = [{"device_map": "auto", "max_memory": {"cpu": "20GiB"}},
                  {"device_map": "auto", "max_memory": {"cpu": "30GiB"}}]
    records = [client.submit(LoadJob.model_validate({"model": path, "placement": p})).wait(timeout=120)
               for p in placements]
    assert all(r.status is JobStatus.succeeded for r in records), [r.error for r in records]
    results = [r.result for r in records if r.result is not None]
    assert len({r.model_key for r in results}) == 1
    assert [r.cache_hit for r in results] == [False, True]
    assert results[0].device_map == {"": "cpu"}
