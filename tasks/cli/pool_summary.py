"""`modelq ls`'s summary of a pool: workers by device and state, models by base, free bytes.

At thousands of workers a line per worker is a wall nobody reads; the summary is a few
lines whatever the pool's size (`modelq ls --all` lists every worker and model). No torch,
and no schemas: `modelq ls` answers within a second at 2,048 workers, a fresh process each
time, so it reads the entries with json.loads into the few fields it shows (`Listed`)
instead of importing and validating the full contract (`WorkerInfo`, which `--json` prints).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tasks.cli.pool_listing import Listed
from tasks.cli.render import aligned, size

STATES = ("ready", "full", "late")
"""A live worker's state: `ready` has free bytes, `full` has none, `late` missed a beat
(its heartbeat is older than the lateness bound: it may be stuck, or dying)."""


def state(worker: Listed, late_after: float, at: datetime | None = None) -> str:
    """`worker`'s state (one of STATES), `late_after` seconds being a missed beat."""
    age = ((at or datetime.now(UTC)) - worker.heartbeat_at).total_seconds()
    if age > late_after:
        return "late"
    return "ready" if worker.free_bytes > 0 else "full"


@dataclass
class DeviceRow:
    """The workers of one device kind."""

    states: Counter[str] = field(default_factory=Counter)
    capacity: int = 0
    free: int = 0


@dataclass
class BaseRow:
    """The resident copies of one base model."""

    copies: int = 0
    bytes: int = 0
    workers: set[str] = field(default_factory=set)
    tenants: set[str] = field(default_factory=set)


@dataclass
class PoolSummary:
    """What `modelq ls` prints by default."""

    devices: dict[str, DeviceRow]
    bases: dict[str, BaseRow]
    hosts: int

    @property
    def workers(self) -> int:
        return sum(sum(row.states.values()) for row in self.devices.values())


def device_kind(device: str) -> str:
    """'cuda:3' -> 'cuda', 'cpu' -> 'cpu': what a pool is sized by."""
    return device.split(":", 1)[0] or "?"


def summarize(workers: list[Listed], late_after: float) -> PoolSummary:
    """The pool's summary, each worker's state judged with `late_after` (seconds)."""
    now = datetime.now(UTC)
    devices: dict[str, DeviceRow] = defaultdict(DeviceRow)
    bases: dict[str, BaseRow] = defaultdict(BaseRow)
    for worker in workers:
        row = devices[device_kind(worker.device)]
        row.states[state(worker, late_after, now)] += 1
        row.capacity += worker.capacity_bytes
        row.free += worker.free_bytes
        for model in worker.models:
            held = bases[model.base]
            held.copies += 1
            held.bytes += model.bytes
            held.workers.add(worker.name)
            held.tenants.update(model.shared_by or (model.tenant,))
    return PoolSummary(dict(sorted(devices.items())),
                       dict(sorted(bases.items(), key=lambda kv: (-kv[1].copies, kv[0]))),
                       len({w.host for w in workers}))


def summary_lines(summary: PoolSummary, width: int, top: int = 20) -> Iterator[str]:
    """The summary as plain lines within `width` columns: devices, then the `top` bases by copies."""
    yield (f"modelq pool: {summary.workers} worker(s) on {summary.hosts} host(s), "
           f"{sum(b.copies for b in summary.bases.values())} resident model(s)")
    yield from aligned(("device", *STATES, "workers", "capacity", "free"), [
        (kind, *(str(row.states[s]) for s in STATES), str(sum(row.states.values())),
         size(row.capacity), size(row.free)) for kind, row in summary.devices.items()], width)
    if not summary.bases:
        return
    yield ""
    yield from aligned(("base", "copies", "workers", "tenants", "bytes"), [
        (base, str(held.copies), str(len(held.workers)), str(len(held.tenants)), size(held.bytes))
        for base, held in list(summary.bases.items())[:top]], width)
    if len(summary.bases) > top:
        yield f"... and {len(summary.bases) - top} more base(s): `modelq ls --all`"
