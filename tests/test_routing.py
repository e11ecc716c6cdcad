"""Routing without workers: holders, most free bytes, and the load claim that keeps one load per key."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from schemas import AttachAdapterJob, LoadJob, ModelRef, ResidentModel, WorkerInfo
from tasks.keys import SHARED_QUEUE, Keys, worker_queue
from tasks.registry import Registry, choose_queue, claim, request_key
from tasks.store import Store

NOW = datetime.now(UTC)
KEY = "ab" * 16


def _worker(name: str, free: int, models: tuple[ResidentModel, ...] = ()) -> WorkerInfo:
    return WorkerInfo(name=name, host="h", pid=1, device="cpu", queue=worker_queue(name),
                      capacity_bytes=100, free_bytes=free, models=models, started_at=NOW,
                      heartbeat_at=NOW)


def test_route_prefers_the_holder_then_the_most_free_bytes() -> None:
    job = LoadJob(model=ModelRef(path="/m"))
    held = ResidentModel(model_key=KEY, base="/m", tenant="default", bytes=10, last_used=NOW,
                         request_keys=(request_key(job),))
    pool = [_worker("a", 10, (held,)), _worker("b", 90), _worker("c", 50)]
    assert choose_queue(job, pool) == worker_queue("a")
    assert choose_queue(LoadJob(model=ModelRef(path="/other")), pool) == worker_queue("b")
    attach = AttachAdapterJob(model_key=KEY, adapter=ModelRef(path="/l"))
    assert choose_queue(attach, pool) == worker_queue("a")
    assert choose_queue(LoadJob(model=ModelRef(path="/x")), [_worker("full", 0)]) == SHARED_QUEUE


def test_identical_loads_follow_the_claim_until_it_is_released(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys()
    registry = Registry(client, keys)
    for info in (_worker("a", 50), _worker("b", 40)):
        client.set(keys.worker(info.name), info.model_dump_json())
        client.sadd(keys.workers(), info.name)
    job = LoadJob(model=ModelRef(path="/m"))
    assert registry.route(job) == worker_queue("a")
    client.set(keys.worker("b"), _worker("b", 90).model_dump_json())  # b now has more room
    assert registry.route(job) == worker_queue("a")  # but a is loading this very request
    assert registry.route(LoadJob(model=ModelRef(path="/n"))) == worker_queue("b")
    store = Store(client, keys, record_ttl=60)
    store.release([claim(keys, job, "b")])  # not b's claim: it stays
    assert registry.route(job) == worker_queue("a")
    store.release([claim(keys, job, "a")])  # what worker a drops with the job's final record
    assert registry.route(job) == worker_queue("b")
    client.delete(keys.worker("b"))  # b died holding the claim: the next load is not sent there
    assert registry.route(job) == worker_queue("a")


def test_read_returns_workers_and_other_keys_in_one_trip(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys()
    registry = Registry(client, keys)
    client.set(keys.worker("a"), _worker("a", 50).model_dump_json())
    client.sadd(keys.workers(), "a", "gone")  # gone: registered, its entry expired
    client.set("limits", "{}")
    workers, values = registry.read(also=["limits", "missing"])
    assert [w.name for w in workers] == ["a"] and values == [b"{}", None]
    assert client.smembers(keys.workers()) == {b"a"}  # the expired name was dropped
