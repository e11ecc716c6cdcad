"""How `python -m bench.scale` reads a submit's cost with the pool's beats running.

Redis CPU: Redis's CPU counter from the submit loop's start until the consumers ran its
last job is the gross figure; the pool's own background (its beats, reaper turns and the
consumers' polls, the same whether anyone submits or not) is measured in a window of the
same pool just before the loop and just after that, nothing submitted and the consumers
idle, and its rate times the counted span is taken off: the net figure is what the submits
and the jobs they started cost Redis. (The window after once started while the niced
consumers still ran the loop's last jobs, which counted their Redis work as background.)
Latency: the loop is cut into windows of equal length (half a worker TTL each: one reaper
turn per window), and the figures are the medians of the windows' p50 and p99, so one
window where a dead worker's loads or a reaper turn landed does not decide them alone.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import redis

from bench.figures import percentile
from bench.scale_redis import counters


def background_rate(client: redis.Redis, seconds: float,
                    commands: dict[str, Any] | None = None) -> float:
    """Redis CPU seconds per second over `seconds` with nothing submitted by the bench; into
    `commands`, if given, the calls per second and µs per call of each command run then."""
    stats = _commandstats(client)
    before, begun = counters(client), time.perf_counter()
    time.sleep(seconds)
    after, took = counters(client), time.perf_counter() - begun
    if commands is not None:
        for name, (calls, usec) in _commandstats(client).items():
            calls -= stats.get(name, (0, 0))[0]
            usec -= stats.get(name, (0, 0))[1]
            if calls > 0:
                commands[name] = {"per_s": round(calls / took, 1), "us": round(usec / calls, 1)}
    return (after.cpu_seconds - before.cpu_seconds) / took


def _commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in stats.items()}


def windowed(timings: list[tuple[float, float]], span: float) -> dict[str, Any]:
    """`timings`: (seconds since the loop began, latency) per submit. The medians over windows
    of `span` seconds of each window's p50 and p99 (ms), with the windows' own figures."""
    windows: dict[int, list[float]] = {}
    for at, latency in timings:
        windows.setdefault(int(at // span), []).append(latency)
    full = [w for w in windows.values() if len(w) >= 20] or list(windows.values())
    p50s = [1000 * percentile(w, 50) for w in full]
    p99s = [1000 * percentile(w, 99) for w in full]
    return {"window_seconds": span, "windows_p50_ms": [round(v, 3) for v in p50s],
            "windows_p99_ms": [round(v, 3) for v in p99s],
            "p50_ms": statistics.median(p50s), "p99_ms": statistics.median(p99s)}


def net_cpu(gross_seconds: float, span_seconds: float, rates: list[float],
            submits: int) -> dict[str, Any]:
    """Redis CPU seconds per 1,000 submits, gross (`gross_seconds` over `span_seconds`) and
    net of the background `rates` (CPU seconds per second, measured before and after)."""
    rate = sum(rates) / len(rates)
    net = max(0.0, gross_seconds - rate * span_seconds)
    return {"redis_cpu_per_1k_gross": 1000 * gross_seconds / submits,
            "redis_cpu_per_1k": 1000 * net / submits,
            "background_cpu_per_s": [round(r, 4) for r in rates],
            "counted_seconds": round(span_seconds, 2)}
