"""Reading the registry's live entries, raw: shared by `Registry.workers` (validated into
WorkerInfo) and `modelq ls` (json.loads into the fields it shows), so that both list the
same workers the same way. No schemas here: `modelq ls` starts without importing them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis

from tasks.state.connection import text
from tasks.state.keys import Keys
from tasks.state.scripts import script


def live_entries(client: redis.Redis, keys: Keys) -> list[tuple[float, bytes]]:
    """(deadline in epoch ms, entry JSON) of every live worker, by name: one round trip (the
    registry_list script), O(workers): a listing, never on a job's path."""
    reply = cast(list[Any], script(client, "registry_list")(keys=[keys.deadlines()],
                                                            args=[keys.worker("")]))
    entries = sorted((text(name), float(deadline), raw) for name, deadline, raw
                     in zip(reply[::3], reply[1::3], reply[2::3], strict=True) if raw)
    return [(deadline, raw) for _, deadline, raw in entries]


def beat_at(deadline_ms: float, ttl_seconds: float) -> datetime:
    """When a worker last beat: its deadline less its TTL."""
    return datetime.fromtimestamp(deadline_ms / 1000, tz=UTC) - timedelta(seconds=ttl_seconds)
