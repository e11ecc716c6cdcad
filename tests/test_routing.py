"""Routing from the registry's indexes, without worker processes: holders, most free bytes,
the load claim that keeps one load per key, task offers, and dead workers' stale entries."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis

from schemas import (
    AccessDenied,
    AttachAdapterJob,
    LoadJob,
    ModelNotFound,
    ModelRef,
    RunJob,
    TaskNotFound,
    UnloadJob,
)
from tasks.state.keys import SHARED_QUEUE, Keys, worker_queue
from tasks.state.registry import Registry, check_model_owner, claim, request_key
from tasks.state.store import Store
from tests.support.registry import KEY, Pool, resident

KEYS = Keys()


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_route_prefers_the_holder_then_the_most_free_bytes(client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    job = LoadJob(model=ModelRef(path="/m"))
    pool.add("a", 10, (resident(job),))
    pool.add("b", 90)
    pool.add("c", 50)
    assert registry.route(job) == worker_queue("a")  # resident there: no claim
    assert not client.exists(KEYS.loading(request_key(job)))
    assert registry.route(LoadJob(model=ModelRef(path="/other"))) == worker_queue("b")
    assert registry.route(AttachAdapterJob(model_key=KEY, adapter=ModelRef(path="/l"))) == worker_queue("a")
    assert registry.route(UnloadJob(model_key=KEY)) == worker_queue("a")
    with pytest.raises(ModelNotFound, match="not resident"):
        registry.route(UnloadJob(model_key="cd" * 16))
    pool.add("d", 90)  # a tie on free bytes goes to the greater name
    assert registry.route(LoadJob(model=ModelRef(path="/tie"))) == worker_queue("d")


def test_full_or_absent_workers_leave_loads_on_the_shared_queue(client: redis.Redis) -> None:
    registry = Registry(client, KEYS)
    assert registry.route(LoadJob(model=ModelRef(path="/x"))) == SHARED_QUEUE
    Pool(client).add("full", 0)
    assert registry.route(LoadJob(model=ModelRef(path="/x"))) == SHARED_QUEUE


def test_identical_loads_follow_the_claim_until_it_is_released(client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    pool.add("a", 50)
    pool.add("b", 40)
    job = LoadJob(model=ModelRef(path="/m"))
    assert registry.route(job) == worker_queue("a")
    pool.change("b", 90)  # b now has more room
    assert registry.route(job) == worker_queue("a")  # but a is loading this very request
    assert registry.route(LoadJob(model=ModelRef(path="/n"))) == worker_queue("b")
    store = Store(client, KEYS, record_ttl=60)
    store.release([claim(KEYS, job, "b")])  # not b's claim: it stays
    assert registry.route(job) == worker_queue("a")
    store.release([claim(KEYS, job, "a")])  # what worker a drops with the job's final record
    assert registry.route(job) == worker_queue("b")
    pool.kill("b")  # b died holding the claim: the next load is not sent there
    assert registry.route(job) == worker_queue("a")


def test_run_jobs_go_only_to_workers_offering_their_task(client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    load = LoadJob(model=ModelRef(path="/m"))
    run = RunJob.model_validate({"task": "acme.score", "model": {"load": load.model_dump()}})
    assert registry.route(run) == SHARED_QUEUE  # no live worker: it waits
    pool.add("plain", 90, (resident(load),), tasks=("modelq.generate",))
    with pytest.raises(TaskNotFound, match=r"acme.score.*modelq.generate"):
        registry.route(run)
    pool.add("acme", 10, tasks=("acme.score", "modelq.generate"))
    assert registry.route(run) == worker_queue("acme")  # not the holder, which lacks the task
    on_key = RunJob.model_validate({"task": "acme.score", "model": {"model_key": KEY}})
    with pytest.raises(ModelNotFound):
        registry.route(on_key)  # held only where the task is not offered
    pool.change("acme", 10, (resident(load),))
    assert registry.route(on_key) == worker_queue("acme")


def test_dead_workers_drop_out_of_routing_with_no_scan_and_no_reaper(client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    job = LoadJob(model=ModelRef(path="/m"))
    pool.add("a", 10, (resident(job),))
    pool.add("b", 90)
    scans = client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    pool.kill("a")  # its index entries stay until it is reaped: they are ignored
    assert client.sismember(KEYS.serving(request_key(job)), "a")
    assert registry.route(job) == worker_queue("b")
    with pytest.raises(ModelNotFound):
        registry.route(UnloadJob(model_key=KEY))
    pool.kill("b")
    assert registry.route(LoadJob(model=ModelRef(path="/n"))) == SHARED_QUEUE
    assert registry.workers() == [] and registry.holder(KEY) is None
    assert client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == scans


def test_another_tenants_model_is_reported_for_access_denied(client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    pool.add("a", 10, (resident(LoadJob(model=ModelRef(path="/m")), tenant="acme"),))
    keys, args = registry.route_call(UnloadJob(model_key=KEY, tenant="other"))
    route = registry.parse_route(keys, registry.route_script(keys=keys, args=args))
    assert route.tenants == ("acme",) and route.detail == worker_queue("a")
    with pytest.raises(AccessDenied):
        check_model_owner(UnloadJob(model_key=KEY, tenant="other"), route.tenants)
    check_model_owner(UnloadJob(model_key=KEY, tenant="acme"), route.tenants)


def test_workers_lists_the_live_pool_with_beat_times_from_deadlines(client: redis.Redis) -> None:
    pool, registry = Pool(client), Registry(client, KEYS)
    pool.add("b", 10)
    pool.add("a", 20, ttl=5)
    pool.kill("b")
    (a,) = registry.workers()
    assert a.name == "a" and a.ttl_seconds == 5
    assert abs((datetime.now(UTC) - a.heartbeat_at).total_seconds()) < 2
