"""The pool as `modelq ls` reads it: live workers and their models, the few fields it shows.

No torch, and no schemas: `modelq ls` answers within a second at 2,048 workers, a fresh
process each time, so it reads the entries with json.loads into `Listed` instead of
importing and validating the full contract (`WorkerInfo`, which `--json` prints).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tasks.state.registry_entries import beat_at

if TYPE_CHECKING:
    from tasks.settings import Settings


@dataclass(frozen=True, slots=True)
class ListedModel:
    """A resident model as `modelq ls` shows it (the fields of schemas.ResidentModel it reads)."""

    model_key: str
    base: str
    tenant: str
    bytes: int
    pinned: bool
    adapters: tuple[str, ...]
    shared_by: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Listed:
    """A live worker as `modelq ls` shows it (the fields of schemas.WorkerInfo it reads)."""

    name: str
    host: str
    device: str
    capacity_bytes: int
    free_bytes: int
    heartbeat_at: datetime
    models: tuple[ListedModel, ...]


def listed(entry: dict[str, Any], deadline_ms: float | None = None) -> Listed:
    """A worker's registry entry (WorkerInfo as JSON, decoded) as ls shows it; its beat time
    from its deadline (as `Registry.workers` reads it) when the entry has a TTL."""
    ttl = entry.get("ttl_seconds")
    if deadline_ms is not None and ttl is not None:
        beat = beat_at(deadline_ms, ttl)
    else:
        beat = datetime.fromisoformat(entry["heartbeat_at"])
    models = tuple(ListedModel(m["model_key"], m["base"], m["tenant"], m["bytes"],
                               m.get("pinned", False), tuple(m.get("adapters", ())),
                               tuple(m.get("shared_by", ()))) for m in entry.get("models", ()))
    return Listed(entry["name"], entry["host"], entry["device"], entry["capacity_bytes"],
                  entry["free_bytes"], beat, models)


def read_pool(settings: Settings) -> list[Listed]:
    """The live workers by name, in one round trip (the registry_list script: O(workers), a
    listing, never on a job's path). A tenant's client sees the pool as tasks/tenants.py
    says it may, through the validated path."""
    if settings.tenant is not None:
        from tasks.client import Client

        return [listed(w.model_dump(mode="json")) for w in Client(settings).workers()]
    from tasks.state.connection import connect
    from tasks.state.keys import Keys
    from tasks.state.registry_entries import live_entries

    keys = Keys(settings.key_prefix)
    try:
        return [listed(json.loads(raw), deadline)
                for deadline, raw in live_entries(connect(settings), keys)]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"a worker entry under {keys.worker('*')} does not read as a modelq "
                         f"worker's ({exc!r}): is a worker of another modelq version here?") from exc
