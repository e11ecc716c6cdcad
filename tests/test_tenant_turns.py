"""Tenant turns (tasks/state/turns.py): the fair choice is made in Redis when a job is taken.

The end-to-end behaviour (a flood does not hold back a small tenant, through a real worker)
is tests/test_tenants_fairness.py; here the script's turns are checked message by message.
"""

from __future__ import annotations

from pathlib import Path

import redis

from tasks.client import Client
from tasks.state.keys import Keys
from tasks.state.turns import DEPTH, Turns, announce
from tasks.tenants import load_tenants, single_tenant
from tests.support.tenancy import write_tenants

KEYS = Keys()
QUEUE = KEYS.queue()


def _turns(client: redis.Redis, tmp_path: Path) -> Turns:
    tenants = load_tenants(write_tenants(tmp_path / "tenants.toml", {
        "flood": {"key": "flood-key-0123456789abcdef"},
        "small": {"key": "small-key-0123456789abcdef", "priority": 2}}))
    return Turns.for_worker(client, KEYS, tenants, KEYS.worker_queue("w1"), worker_ttl=3)


def _send(client: redis.Redis, share: str, *messages: bytes) -> None:
    for message in messages:
        client.lpush(share, message)  # as kombu sends: LPUSH, taken from the right
        announce(client, KEYS, QUEUE, share, worker_ttl=3)


def _take_all(client: redis.Redis, turns: Turns) -> list[bytes]:
    """What a consumer of the shared queue gets, one message at a time, turns taken each time."""
    taken = []
    while (message := client.rpop(QUEUE)) is not None:
        taken.append(message)
        turns.take()
    return taken


def test_a_flood_takes_turns_with_a_newcomer_and_priority_weights_them(
        client: Client, tmp_path: Path) -> None:
    turns = _turns(client.redis, tmp_path)
    flood, (small, small2) = KEYS.tenant_queues("flood", 1), KEYS.tenant_queues("small", 2)
    _send(client.redis, flood[0], *(b"f%d" % i for i in range(8)))
    _send(client.redis, small, b"s0", b"s2")
    _send(client.redis, small2, b"s1", b"s3")
    assert client.redis.llen(QUEUE) == DEPTH == 1  # the first flood message, waiting
    taken = _take_all(client.redis, turns)
    # each share's own order kept; the small tenant (two shares) gets two turns to one
    assert taken == [b"f0", b"f1", b"s0", b"s1", b"f2", b"s2", b"s3", b"f3", b"f4", b"f5",
                     b"f6", b"f7"]
    assert not client.redis.exists(KEYS.turns(QUEUE), *flood, small, small2)


def test_messages_that_reach_a_share_without_an_announce_are_found_by_the_sweep(
        client: Client, tmp_path: Path) -> None:
    turns = _turns(client.redis, tmp_path)
    own_share = KEYS.tenant_queues("small", 2, KEYS.worker_queue("w1"))[1]
    client.redis.rpush(own_share, b"restored")  # as kombu or worker/recovery/rescue.py put one back
    assert turns.take() == 0  # not in the ring: nothing to take
    assert turns.sweep() == 1
    assert client.redis.lrange(KEYS.worker_queue("w1"), 0, -1) == [b"restored"]


def test_a_queue_with_a_message_waiting_is_not_filled_further(client: Client,
                                                              tmp_path: Path) -> None:
    turns = _turns(client.redis, tmp_path)
    client.redis.lpush(QUEUE, b"sent straight to the queue")
    _send(client.redis, KEYS.tenant_queues("flood")[0], b"f0", b"f1")
    assert client.redis.llen(QUEUE) == 1
    assert client.redis.ttl(KEYS.turns(QUEUE)) > 0  # a gone pool's rings expire
    assert _take_all(client.redis, turns) == [b"sent straight to the queue", b"f0", b"f1"]


def test_a_single_tenant_worker_takes_no_turns(client: Client) -> None:
    turns = Turns.for_worker(client.redis, KEYS, single_tenant(), "modelq.worker.w1", worker_ttl=3)
    assert turns.shares == {}
    assert turns.take() == turns.sweep() == 0
