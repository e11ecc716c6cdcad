"""Connecting to Redis, for producers and workers alike (no torch, no key names here).

`connect(settings)` is the one place a client is built: a plain redis:// URL or the
master that Redis Sentinel names. Key names live in tasks/state/keys.py, scripts in
tasks/state/scripts.py.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from tasks.settings import Settings

MAX_BLOCK_SECONDS = 30.0
"""The longest a blocking read (XREAD BLOCK) may wait: a `blocking` client's socket timeout
is this plus the command timeout, so no wait is cut short and none hangs for ever."""


def connect(settings: Settings, *, blocking: bool = False) -> redis.Redis:
    """A Redis client that fails within the connect timeout instead of hanging.

    A command that gets no reply fails after `command_timeout_seconds` (a Redis that accepts
    connections but never answers); a `blocking` client, for reads that wait on purpose, gets
    MAX_BLOCK_SECONDS more (its own connections, so other commands keep the short timeout).

    With a redis:// URL a refused connection fails at once (no retry: `submit` against a
    dead Redis reports BrokerUnavailable right away; the worker retries its own writes).
    With a sentinel:// URL it is the master's client: each new connection asks the
    sentinels where the master is, so after a failover the next command reaches the
    promoted replica. A command refused by the old master is retried twice on a new
    connection (a connect timeout is not retried, so timing stays that of one connect).
    """
    options: dict[str, Any] = dict(
        socket_connect_timeout=settings.connect_timeout_seconds,
        socket_timeout=settings.command_timeout_seconds + (MAX_BLOCK_SECONDS if blocking else 0),
        health_check_interval=30,
    )
    target = settings.sentinel
    if target is None:
        return redis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), **options)
    failover = Retry(ExponentialBackoff(cap=1.0, base=0.1), 2,
                     supported_errors=(redis.ConnectionError,))
    sentinels = Sentinel(list(target.nodes),
                         sentinel_kwargs=settings.sentinel_kwargs())
    master: redis.Redis = sentinels.master_for(
        target.master, db=target.db, username=target.username, password=target.password,
        retry=failover, **options)
    return master


def connect_async(settings: Settings, max_connections: int = 100) -> redis.asyncio.Redis:
    """The asyncio client on the same Redis (the gateway's event streams: no thread per follower).

    The same timeouts as `connect`; under Sentinel, the master's client as there. A blocking
    read holds a connection, so `max_connections` bounds how many can wait at once.
    """
    options: dict[str, Any] = dict(
        socket_connect_timeout=settings.connect_timeout_seconds,
        socket_timeout=settings.connect_timeout_seconds + 60,
        max_connections=max_connections,
    )
    target = settings.sentinel
    if target is None:
        return redis.asyncio.Redis.from_url(settings.redis_url, **options)
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    sentinels = AsyncSentinel(list(target.nodes),
                              sentinel_kwargs=settings.sentinel_kwargs())
    master: redis.asyncio.Redis = sentinels.master_for(
        target.master, db=target.db, username=target.username, password=target.password, **options)
    return master


def text(value: bytes | str) -> str:
    """A reply as str: clients without decode_responses answer bytes."""
    return value.decode() if isinstance(value, bytes) else value
