"""`modelq ls`'s summary of a pool: workers by device and state, models by base, free bytes.

At thousands of workers a line per worker is a wall nobody reads; the summary is a few
lines whatever the pool's size (`modelq ls --all` lists every worker and model). No torch.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.table import Table

from schemas import WorkerInfo
from tasks.render import size

STATES = ("ready", "full", "late")
"""A live worker's state: `ready` has free bytes, `full` has none, `late` missed a beat
(its heartbeat is older than the lateness bound: it may be stuck, or dying)."""


def state(worker: WorkerInfo, late_after: float, at: datetime | None = None) -> str:
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


def summarize(workers: list[WorkerInfo], late_after: float) -> PoolSummary:
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


def summary_table(summary: PoolSummary, top: int = 20) -> Table:
    """The summary as tables: devices, then the `top` bases by copies."""
    grid = Table.grid()
    grid.title = (f"modelq pool: {summary.workers} worker(s) on {summary.hosts} host(s), "
                  f"{sum(b.copies for b in summary.bases.values())} resident model(s)")
    devices = Table(pad_edge=False, box=None)
    for heading in ("device", *STATES, "workers", "capacity", "free"):
        devices.add_column(heading, justify="left" if heading == "device" else "right")
    for kind, row in summary.devices.items():
        devices.add_row(kind, *(str(row.states[s]) for s in STATES), str(sum(row.states.values())),
                        size(row.capacity), size(row.free))
    grid.add_row(devices)
    if summary.bases:
        bases = Table(pad_edge=False, box=None, title_justify="left")
        for heading in ("base", "copies", "workers", "tenants", "bytes"):
            bases.add_column(heading, overflow="fold", justify="left" if heading == "base" else "right")
        for base, held in list(summary.bases.items())[:top]:
            bases.add_row(base, str(held.copies), str(len(held.workers)), str(len(held.tenants)),
                          size(held.bytes))
        grid.add_row("")
        grid.add_row(bases)
        if len(summary.bases) > top:
            grid.add_row(f"... and {len(summary.bases) - top} more base(s): `modelq ls --all`")
    return grid
