"""The gateway's event streams, served on the event loop: no thread per follower (no torch).

A follower of `/v1/jobs/{id}/events` waits on Redis with XREAD BLOCK over an asyncio
connection, so hundreds of followers cost sockets, not threads, and `/healthz` and submits
answer at once however many follow. Stream ids become SSE ids: a client that reconnects
resumes with Last-Event-ID. A stream ends after the job's terminal event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import redis
import redis.asyncio

from schemas import TERMINAL, Event, JobRecord
from tasks.state.keys import Keys
from tasks.state.store import not_found, parse_events

log = logging.getLogger(__name__)

MAX_FOLLOWERS = 4096
"""Event streams one gateway follows at once: each blocking read holds a Redis connection
(Redis takes 10,000 clients by default). One more is answered 503, retryable."""
KEEPALIVE_MS = 15_000
"""A comment line this often on a quiet stream, so proxies and clients see it is alive."""


class EventStreams:
    """Reads records and event streams for the gateway's async endpoints.

    `connect` builds the asyncio client, once per event loop (its connections belong to the
    loop that opened them: one under uvicorn, one per request under a bare TestClient).
    """

    def __init__(self, connect: Callable[[], redis.asyncio.Redis], keys: Keys,
                 keepalive_ms: int = KEEPALIVE_MS) -> None:
        self.connect = connect
        self.keys = keys
        self.keepalive_ms = keepalive_ms
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis: redis.asyncio.Redis | None = None

    @property
    def redis(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if self._redis is None or self._loop is not loop:
            self._redis, self._loop = self.connect(), loop
        return self._redis

    async def record(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.get(self.keys.job(job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    async def own_record(self, job_id: str, who: str) -> JobRecord:
        """The record if it is `who`'s; another tenant's job reads as one that does not exist."""
        record = await self.record(job_id)
        if record is None or record.tenant != who:
            raise not_found(job_id)  # word for word what a missing id gets
        return record

    async def ping(self) -> None:
        await self.redis.ping()

    async def sse(self, job_id: str, after: str) -> AsyncIterator[str]:
        """The job's events after stream id `after`, as SSE messages, until the terminal one."""
        try:
            while True:
                batch = await self._read(job_id, after, self.keepalive_ms)
                ended = not batch and await self._ended(job_id)
                if ended:  # its last events went in with the terminal record: read them at once
                    batch = await self._read(job_id, after, None)
                for after, event in batch:
                    yield f"id: {after}\nevent: {event.status.value}\ndata: {event.model_dump_json()}\n\n"
                    if event.status in TERMINAL:
                        return
                if ended:  # ended (or expired) past the events read
                    return
                if not batch:
                    yield ": keepalive\n\n"
        except redis.RedisError as exc:
            error = {"type": "BrokerUnavailable", "message": f"Redis is unreachable ({type(exc).__name__})",
                     "retryable": True}
            yield f"event: error\ndata: {json.dumps(error)}\n\n"

    async def _ended(self, job_id: str) -> bool:
        record = await self.record(job_id)
        return record is None or record.terminal

    async def _read(self, job_id: str, after: str, block_ms: int | None) -> list[tuple[str, Event]]:
        reply = cast(list[Any] | None, await self.redis.xread(
            {self.keys.events(job_id): after}, count=200, block=block_ms))
        return parse_events(job_id, reply)
