"""Queued work is served fairly between tenants, and submit-time quotas fail fast.

The full measurement (500 jobs against 5, waits in seconds) is bench/fairness.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob, QuotaExceeded
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import SHARED_QUEUE, tenant_queues
from tasks.tenants import load_tenants, pick_queue, publish_limits, read_limits
from tests.support.tenancy import copy_into, tenant_client, write_tenants
from tests.support.workers import WorkerPool

KEYS = {"flood": "flood-key-0123456789abcdef", "small": "small-key-0123456789abcdef",
        "q": "q-key-0123456789abcdef0000"}


def _tenants(tmp_path: Path) -> Path:
    return write_tenants(tmp_path / "tenants.toml", {
        "flood": {"key": KEYS["flood"], "roots": [str(tmp_path)]},
        "small": {"key": KEYS["small"], "roots": [str(tmp_path)], "priority": 2},
        "q": {"key": KEYS["q"], "max_queued_jobs": 2, "max_concurrent_jobs": 3},
    })


def test_submit_quotas_name_the_quota_and_the_numbers(client: Client, settings: Settings,
                                                      tmp_path: Path) -> None:
    publish_limits(client.redis, client.keys, load_tenants(_tenants(tmp_path)))
    q = tenant_client(settings, "q", KEYS["q"])
    first, _ = (q.submit(LoadJob(model="/nowhere/m")) for _ in range(2))  # no worker: they wait
    with pytest.raises(QuotaExceeded) as info:
        q.submit(LoadJob(model="/nowhere/m"))
    assert "2 jobs queued and max_queued_jobs is 2" in info.value.message
    assert info.value.details == {"quota": "max_queued_jobs", "used": 2, "limit": 2}
    client.store.transition(first.job_id, JobStatus.running)  # one starts: room for one more
    q.submit(LoadJob(model="/nowhere/m"))
    with pytest.raises(QuotaExceeded) as info:
        q.submit(LoadJob(model="/nowhere/m"))
    assert info.value.details["quota"] in ("max_queued_jobs", "max_concurrent_jobs")
    first.cancel()
    client.store.transition(first.job_id, JobStatus.failed)
    limits = read_limits(client.redis, client.keys, "small")
    assert limits is not None and limits.priority == 2
    assert {pick_queue("small", limits, f"{i:08x}") for i in range(4)} == set(
        tenant_queues("small", 2))


@pytest.mark.e2e
def test_a_flood_does_not_hold_back_a_small_tenant(client: Client, pool: WorkerPool,
                                                   settings: Settings, models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    model = str(copy_into(models["llama"], tmp_path / "llama"))
    tenants = _tenants(tmp_path)
    publish_limits(client.redis, client.keys, load_tenants(tenants))  # as the worker will
    flood, small = (tenant_client(settings, t, KEYS[t]) for t in ("flood", "small"))
    flooded = [flood.submit(LoadJob(model=model)) for _ in range(24)]
    smalls = [small.submit(LoadJob(model=model)) for _ in range(3)]
    pool.start("w1", env={"MODELQ_TENANTS_FILE": str(tenants)})
    records = [h.wait(timeout=120) for h in flooded + smalls]
    assert all(r.status is JobStatus.succeeded for r in records), [r.error for r in records]
    order = sorted(records, key=lambda r: r.started_at)  # type: ignore[arg-type,return-value]
    positions = [i for i, r in enumerate(order) if r.tenant == "small"]
    # queued behind 24 jobs, the 3 small ones still start among the first few (FIFO: 24-26)
    assert max(positions) <= 6, positions


@pytest.mark.e2e
def test_work_queued_before_any_worker_ran_is_served_fairly(
        client: Client, pool: WorkerPool, settings: Settings, models: dict[str, Path],
        tmp_path: Path) -> None:
    """No limits published yet: the producers send to the one shared queue; the first worker
    puts that work into the tenants' shares before it consumes."""
    model = str(copy_into(models["llama"], tmp_path / "llama"))
    tenants = write_tenants(tmp_path / "tenants.toml", {
        "flood": {"key": KEYS["flood"], "roots": [str(tmp_path)]},
        "small": {"key": KEYS["small"], "roots": [str(tmp_path)]},  # priority 1, as flood
    })
    assert read_limits(client.redis, client.keys, "small") is None  # no worker has run
    flood, small = (tenant_client(settings, t, KEYS[t]) for t in ("flood", "small"))
    flooded = [flood.submit(LoadJob(model=model)) for _ in range(30)]  # type: ignore[arg-type]
    smalls = [small.submit(LoadJob(model=model)) for _ in range(3)]  # type: ignore[arg-type]
    assert client.redis.llen(SHARED_QUEUE) == 33
    pool.start("w1", env={"MODELQ_TENANTS_FILE": str(tenants)})
    records = [h.wait(timeout=180) for h in flooded + smalls]
    assert all(r.status is JobStatus.succeeded for r in records), [r.error for r in records]
    order = sorted(records, key=lambda r: r.started_at)  # type: ignore[arg-type,return-value]
    positions = [i for i, r in enumerate(order) if r.tenant == "small"]
    # FIFO would start them at 30-32; in turns with the flood they start among the first six
    assert max(positions) <= 6, positions
