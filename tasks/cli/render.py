"""How the CLI shows records, events and the pool to a person (no torch).

Schemas and rich are imported by the functions that use them: `modelq ls` on a large pool
prints plain lines (`columns`, `workers_lines`) and must start within a fraction of a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from schemas import Event, JobRecord
    from tasks.cli.pool_listing import Listed, ListedModel


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def record_table(record: JobRecord) -> Table:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in record_rows(record):
        table.add_row(key, value)
    return table


def record_text(record: JobRecord, bold: bool = False) -> str:
    """`record_table` as plain text, without rich (what `modelq status` prints: importing rich
    costs a fresh process a tenth of a second): keys in a column, values two spaces after,
    a value's further lines under its first; keys in bold (ANSI) when `bold`."""
    rows = record_rows(record)
    width = max(len(key) for key, _ in rows)
    lines = []
    for key, value in rows:
        first, *more = value.splitlines() or [""]
        shown = f"\x1b[1m{key}\x1b[0m" + " " * (width - len(key)) if bold else key.ljust(width)
        lines.append(f"{shown}  {first}")
        lines += [" " * (width + 2) + line for line in more]
    return "\n".join(lines)


def record_rows(record: JobRecord) -> list[tuple[str, str]]:
    """What a person reads of a record, as (key, value) rows."""
    from schemas import RunResult

    rows: list[tuple[str, str]] = [
        ("job", record.job_id), ("kind", record.kind.value), ("tenant", record.tenant),
        ("status", record.status.value), ("attempt", str(record.attempt)),
    ]
    if record.stage is not None and not record.terminal:
        rows.append(("stage", record.stage.value))
    if record.worker:
        rows.append(("worker", f"{record.worker} ({record.device})"))
    if record.started_at and record.finished_at:
        rows.append(("took", f"{(record.finished_at - record.started_at).total_seconds():.2f}s"))
    if isinstance(record.result, RunResult):
        run = record.result
        rows += [("model_key", run.model_key), ("task took", f"{run.seconds:.2f}s"),
                 ("cache_hit", "yes" if run.cache_hit else "no"),
                 ("value", json.dumps(run.value, ensure_ascii=False)[:2000])]
    elif record.result is not None:
        info = record.result
        rows += [
            ("model_key", info.model_key), ("model", f"{info.model_class} from {info.base_model.ref}"),
            ("revision", info.base_model.revision or info.base_model.fingerprint or "-"),
            ("parameters", f"{info.num_parameters:,}"), ("footprint", size(info.footprint_bytes)),
            ("dtype", info.dtype), ("quantization", info.quantization),
            ("device_map", ", ".join(f"{k or '*'}: {v}" for k, v in info.device_map.items())),
            ("adapters", ", ".join(info.adapters) or "-"),
            ("active", ", ".join(info.active_adapters) or "-"),
            ("cache_hit", "yes" if info.cache_hit else "no"),
        ]
    if record.error is not None:
        rows += [("error", record.error.type), ("message", record.error.message),
                 ("retryable", "yes" if record.error.retryable else "no")]
    return rows


def event_line(event: Event) -> str:
    parts = [event.at.strftime("%H:%M:%S"), event.status.value]
    if event.stage is not None:
        parts.append(event.stage.value)
    if event.progress is not None and event.progress.total:
        parts.append(f"{event.progress.fraction:.0%}")
    if event.message:
        parts.append(event.message)
    return "  ".join(parts)


def workers_table(workers: list[Listed]) -> Table:
    """The pool: a table of workers, then one of resident models (each model's base under
    its key). Made to be read at 80 columns: headings are never cut, a model key is never
    broken (it is what `unload` and `attach` take), and long bases and adapter lists wrap."""
    from rich.table import Table
    from rich.text import Text

    pool = _table(("worker", {}), ("device", {}), ("capacity", {}), ("free", {}),
                  ("models", {"justify": "right"}))
    fold = {"overflow": "fold"}
    held = _table(("model_key / base", {"no_wrap": True}), ("worker", fold), ("tenant", fold),
                  ("size", {}), ("pinned", {}), ("adapters", fold))
    for worker in workers:
        pool.add_row(worker.name, worker.device, size(worker.capacity_bytes),
                     size(worker.free_bytes), str(len(worker.models)))
        for model in worker.models:
            where = Text(model.model_key)
            where.append("\n" + "\n".join(_folded(model.base, len(model.model_key))), style="dim")
            held.add_row(where, worker.name, _tenant(model), size(model.bytes),
                         "yes" if model.pinned else "no", ", ".join(model.adapters) or "-")
    table = Table.grid()
    table.title = "modelq pool"
    table.add_row(pool)
    if held.row_count:
        table.add_row(held)
    saved = sum(m.bytes * (len(m.shared_by) - 1) for w in workers for m in w.models if m.shared_by)
    if saved:
        table.caption = f"shared bases save {size(saved)}"
    return table


def workers_lines(workers: list[Listed]) -> Iterator[str]:
    """The pool as plain lines, a worker and then its models indented under it: what
    `modelq ls --all` prints for a large pool, where a table would take seconds to lay out."""
    for worker in workers:
        yield (f"{worker.name}  {worker.device}  capacity {size(worker.capacity_bytes)}  "
               f"free {size(worker.free_bytes)}  {len(worker.models)} model(s)")
        for model in worker.models:
            yield (f"  {model.model_key}  {model.base}  tenant {_tenant(model)}  {size(model.bytes)}"
                   f"{'  pinned' if model.pinned else ''}  adapters {', '.join(model.adapters) or '-'}")


def _tenant(model: ListedModel) -> str:
    """Whose a resident model is: its tenant, or the tenants sharing a shared base."""
    return f"shared: {', '.join(model.shared_by)}" if model.shared_by else model.tenant


def aligned(headings: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> Iterator[str]:
    """`rows` under `headings` as plain aligned lines within `width` columns where they fit:
    the first column left-aligned and folded (a base path is as long as it is), the others
    right-aligned. What a summary prints instead of a rich table, which costs an import and
    tens of milliseconds to lay out."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headings)]
    rest = sum(widths[1:]) + 2 * (len(widths) - 1)
    widths[0] = max(len(headings[0]), min(widths[0], width - rest))
    for row in (headings, *rows):
        first, *more = _folded(row[0], widths[0])
        right = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        yield "  ".join([first.ljust(widths[0]), *right])
        yield from more


def _table(*columns: tuple[str, dict[str, Any]]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for heading, options in columns:
        table.add_column(heading, min_width=len(heading), **options)
    return table


def _folded(text: str, width: int) -> list[str]:
    """`text` in lines of `width` characters (a base path is as long as it is)."""
    return [text[i:i + width] for i in range(0, len(text), width)] or [""]


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)
