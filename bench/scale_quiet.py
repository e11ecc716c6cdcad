"""`python -m bench.scale`'s quiet window: what a submit itself costs, the pool's beats paused.

With the simulated beats running, a submit on this machine shares its cores with the
simulated hosts' Python (other machines, in a real pool) and Redis with their heartbeat
scripts. Here the beats are paused and the reaper's turn held for under a third of a worker
TTL (no entry lapses meanwhile), and cache hits are submitted back to back: the latency and
the Redis CPU per submit are then the submit's own, with every registry entry and routing
index of the pool still in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from bench.figures import percentile
from bench.scale_redis import counters
from schemas import LoadJob
from tasks.state.keys import Keys


def quiet_window(tell: Callable[[str], Any], client: redis.Redis, keys: Keys,
                 submit: Callable[[LoadJob], str], hits: Sequence[LoadJob], ttl: float,
                 job_ids: list[str]) -> dict[str, Any]:
    """Submit `hits` in turn, beats paused (`tell('pause')`), for a third of `ttl` less a
    second; their p50, p99 and Redis CPU seconds per 1,000 submits."""
    tell("pause")
    client.set(keys.reaper_turn(), "bench", px=int(ttl * 1000))
    latencies: list[float] = []
    try:
        before = counters(client)
        begun = time.perf_counter()
        while time.perf_counter() - begun < max(1.0, ttl / 3 - 1):
            started = time.perf_counter()
            job_ids.append(submit(hits[len(latencies) % len(hits)]))
            latencies.append(time.perf_counter() - started)
        after = counters(client)
    finally:
        client.delete(keys.reaper_turn())
        tell("resume")
    return {"quiet_submits": len(latencies), "quiet_p50_ms": 1000 * percentile(latencies, 50),
            "quiet_p99_ms": 1000 * percentile(latencies, 99),
            "quiet_redis_cpu_per_1k": 1000 * (after.cpu_seconds - before.cpu_seconds) / len(latencies)}


def resp_size(value: Any) -> int:
    """Bytes of `value` as Redis sends it (RESP2): what a reply costs on the wire."""
    if value is None:
        return 5  # $-1\r\n
    if isinstance(value, int):
        return len(f":{value}\r\n")
    if isinstance(value, (list, tuple)):
        return len(f"*{len(value)}\r\n") + sum(resp_size(v) for v in value)
    data = value if isinstance(value, bytes) else str(value).encode()
    return len(f"${len(data)}\r\n") + len(data) + 2


def route_reply_bytes(client: Any, jobs: Sequence[LoadJob]) -> float:
    """Mean bytes of the route script's reply (the registry read a submit makes) for `jobs`,
    each already resident somewhere (no claim is taken)."""
    registry = client.registry
    sizes = []
    for job in jobs:
        keys, args = registry.route_call(job)
        sizes.append(resp_size(registry.route_script(keys=keys, args=args)))
    return sum(sizes) / len(sizes)
