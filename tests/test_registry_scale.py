"""The registry at pool scale, against a real Redis with no worker processes: heartbeats that
do not rewrite an unchanged entry, reaping from deadlines and memos without a scan, and a
submit that costs one round trip and a small reply with 2,048 workers registered."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.connection import Connection

from schemas import LoadJob, ModelRef, ResidentModel
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import Keys
from tasks.state.registry import Registry, request_key
from tests.support.registry import NOW, Pool, resident
from worker.recovery.heartbeat import Heartbeat, WorkerNameTaken, WorkerState
from worker.recovery.reaper import Reaper

KEYS = Keys()


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_an_unchanged_beat_renews_the_entry_without_rewriting_it(client: redis.Redis) -> None:
    pool = Pool(client)
    job = LoadJob(model=ModelRef(path="/m"))
    beat = pool.add("a", 10, (resident(job),), tasks=("acme.score",), ttl=30)
    entry = client.get(KEYS.worker("a"))
    client.pexpire(KEYS.worker("a"), 1000)
    before = client.zscore(KEYS.deadlines(), "a")
    sets = calls(client, "set")
    beat.beat()
    assert calls(client, "set") == sets and client.get(KEYS.worker("a")) == entry
    assert client.pttl(KEYS.worker("a")) > 20_000
    assert client.zscore(KEYS.deadlines(), "a") >= (before or 0)
    pool.change("a", 5)  # what the entry says changed: written again, its indexes too
    assert calls(client, "set") > sets
    assert client.zscore(KEYS.free(), "a") == 5 and client.zscore(KEYS.free("acme.score"), "a") == 5
    pool.change("a", 5, ())  # the model left: its index entries go
    assert not client.exists(KEYS.serving(request_key(job)), KEYS.holders(resident(job).model_key))


def test_a_beat_after_the_entry_vanished_republishes_it_and_its_indexes(client: redis.Redis) -> None:
    pool = Pool(client)
    job = LoadJob(model=ModelRef(path="/m"))
    beat = pool.add("a", 10, (resident(job),), tasks=("acme.score",))
    client.flushall()  # a Redis restart with no persistence
    beat.beat()
    assert client.exists(KEYS.worker("a")) and client.zscore(KEYS.deadlines(), "a")
    assert client.sismember(KEYS.serving(request_key(job)), "a")
    assert client.zscore(KEYS.free("acme.score"), "a") == 10
    assert Registry(client, KEYS).route(job) == KEYS.worker_queue("a")


def test_a_live_name_is_refused_and_a_stopped_worker_leaves_routing(client: redis.Redis) -> None:
    pool = Pool(client)
    first = pool.add("a", 10)
    client.set(KEYS.worker("a"), first.info().model_copy(update={"pid": 1}).model_dump_json())
    other = Heartbeat(client, KEYS, ("a", "cpu"), state=lambda: WorkerState(1, 1, []),
                      timing=(1, 30))
    with pytest.raises(WorkerNameTaken, match="pid 1"):
        other.register()
    first.stop()
    assert Registry(client, KEYS).workers() == []
    assert client.zscore(KEYS.deadlines(), "a") == 0  # left for the reaper to drain its queues
    assert client.zscore(KEYS.free(), "a") is None


def test_the_reaper_drains_a_dead_workers_queues_from_its_memo_without_a_scan(
        client: redis.Redis) -> None:
    share = KEYS.tenant_queues("t", 2, base=KEYS.worker_queue("dead"))
    state = WorkerState(100, 50, [ResidentModel(model_key="cd" * 16, base="/m", tenant="t", bytes=1,
                                                last_used=NOW, request_keys=("rk",))],
                        ("acme.score",), (KEYS.queue(), KEYS.worker_queue("dead"), *share))
    dead = Heartbeat(client, KEYS, ("dead", "cpu"), state=lambda: state, timing=(1, 30))
    dead.register()
    Pool(client).add("live", 10)
    for queue in (KEYS.worker_queue("dead"), *share):
        client.lpush(queue, f"{queue}-1", f"{queue}-2")  # -1 is the oldest (taken from the right)
    client.lpush(KEYS.queue(), "waiting")
    reaper = Reaper(client, KEYS, every=1, worker="live")
    assert reaper.run() == 0  # still live
    client.delete(KEYS.worker("dead"))
    client.zadd(KEYS.deadlines(), {"dead": 1})
    scans = calls(client, "scan")
    assert reaper.run() == 6
    assert client.lrange(KEYS.queue(), 0, -1) == [
        f"{KEYS.worker_queue('dead')}-2".encode(), f"{KEYS.worker_queue('dead')}-1".encode(), b"waiting"]
    assert client.lrange(KEYS.tenant_queues("t", 2)[1], 0, -1) == [
        f"{share[1]}-2".encode(), f"{share[1]}-1".encode()]
    for key in (KEYS.serving("rk"), KEYS.holders("cd" * 16), KEYS.free("acme.score"), *share):
        assert not client.exists(key), key
    assert client.zrange(KEYS.free(), 0, -1) == [b"live"]
    assert client.zrange(KEYS.deadlines(), 0, -1) == [b"live"]
    assert client.zrange(KEYS.reaped(), 0, -1) == [b"dead"]  # watched a while for late messages
    client.lpush(KEYS.worker_queue("dead"), "late")  # put back by the broker after the reap
    assert reaper.run() == 1 and client.lindex(KEYS.queue(), 0) == b"late"
    client.zadd(KEYS.reaped(), {"dead": 1})  # its watch is over: forgotten
    assert reaper.run() == 0
    assert not client.exists(KEYS.reaped(), KEYS.worker_routes("dead"))
    assert calls(client, "scan") == scans


def test_a_beat_carries_the_reaper_bid_and_one_worker_a_period_takes_the_turn(
        redis_url: str, client: redis.Redis) -> None:
    Pool(client).add("dead", 10)
    client.lpush(KEYS.worker_queue("dead"), "orphan")
    client.delete(KEYS.worker("dead"))
    client.zadd(KEYS.deadlines(), {"dead": 1})
    counted = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
        redis_url, connection_class=Counting))
    beats = []
    for name in ("a", "b"):
        reaper = Reaper(counted, KEYS, every=60, worker=name)
        beats.append(Heartbeat(counted, KEYS, (name, "cpu"), state=lambda: WorkerState(1, 1, []),
                               timing=(1, 30)))
        beats[-1].reaper = reaper
        beats[-1].register()
    trips = Counting.trips
    beats[1].beat()  # b's period came first: its beat script won the turn, then it reaped
    assert client.get(KEYS.reaper_turn()) == b"b"
    assert client.lrange(KEYS.queue(), 0, -1) == [b"orphan"]
    reap_trips = Counting.trips - trips
    trips = Counting.trips
    beats[0].beat()  # a bid in its beat and lost: one round trip, nothing else
    assert Counting.trips - trips == 1 < reap_trips
    trips = Counting.trips
    beats[1].beat()  # within b's period: no bid at all
    assert Counting.trips - trips == 1 and client.get(KEYS.reaper_turn()) == b"b"


class Counting(Connection):
    """A connection that counts the round trips made on it."""

    trips = 0
    received = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        Counting.trips += 1
        super().send_packed_command(command, check_health)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().read_response(*args, **kwargs)
        Counting.received += len(repr(reply))
        return reply


def test_a_submit_is_one_small_round_trip_with_2048_workers(redis_url: str, client: redis.Redis) -> None:
    pool = Pool(client)
    job = LoadJob(model=ModelRef(path="/m"))
    for i in range(2048):
        models = (resident(job),) if i == 7 else ()
        pool.add(f"w{i:04d}", 1000 + i, models, tasks=("modelq.generate", "acme.score"))
    producer = Client(Settings(redis_url=redis_url, connect_timeout_seconds=2))
    producer.redis.connection_pool.connection_class = Counting
    producer.redis.connection_pool.reset()
    sent: list[str] = []
    producer.app.send_task = lambda *_, queue, **__: sent.append(queue)  # type: ignore[method-assign]
    producer.submit(LoadJob(model=ModelRef(path="/warm")))  # the handshake, the scripts loaded
    Counting.trips = Counting.received = 0
    producer.submit(job)
    assert Counting.trips == 1 and Counting.received < 4096
    assert sent[-1] == KEYS.worker_queue("w0007")  # where it is resident
    Counting.trips = Counting.received = 0
    producer.submit(LoadJob(model=ModelRef(path="/new")))
    assert Counting.trips == 1 and Counting.received < 4096
    assert client.get(KEYS.loading(request_key(LoadJob(model=ModelRef(path="/new"))))) == \
        KEYS.worker_queue("w2047").encode()
    assert len(Registry(client, KEYS).workers()) == 2048

