"""Benchmark figures: samples of one ratio, their median/min/max, the target, the table and JSON.

Nothing here measures anything; it only summarises and prints what was measured.
A figure with no samples is `n/a` (the feature it measures is absent), with a note.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Direction = Literal["<=", ">="]


@dataclass
class Figure:
    """One benchmark figure: `key`, its samples and the target it is held to."""

    key: str
    target: float | None  # None: reported for context, held to nothing
    direction: Direction
    samples: list[float] = field(default_factory=list)
    unit: str = "x"
    note: str = ""

    def add(self, *values: float) -> None:
        self.samples.extend(float(v) for v in values)

    @property
    def available(self) -> bool:
        return bool(self.samples)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def passed(self) -> bool | None:
        median = self.median
        if median is None or self.target is None:
            return None
        return median <= self.target if self.direction == "<=" else median >= self.target

    @property
    def target_text(self) -> str:
        return "" if self.target is None else f"{self.direction} {self.target:g}"

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.samples, default=None),
                "max": max(self.samples, default=None), "runs": len(self.samples),
                "target": self.target_text or None, "pass": self.passed,
                "unit": self.unit, "note": self.note or None, "samples": self.samples}

    @classmethod
    def from_json(cls, key: str, data: dict[str, Any]) -> Figure:
        """A figure as `as_json` wrote it (another bench module's, merged into one table)."""
        direction, _, target = (data.get("target") or "").partition(" ")
        return cls(key, float(target) if target else None,
                   "<=" if direction != ">=" else ">=", list(data.get("samples") or ()),
                   data.get("unit") or "x", data.get("note") or "")


@dataclass
class Report:
    """The figures of one run, in table order, plus context (machine, counts, raw timings)."""

    figures: list[Figure]
    context: dict[str, Any] = field(default_factory=dict)

    def figure(self, key: str) -> Figure:
        for figure in self.figures:
            if figure.key == key:
                return figure
        raise KeyError(key)

    def as_json(self) -> dict[str, Any]:
        return {"figures": {f.key: f.as_json() for f in self.figures}, "context": self.context}

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2, default=str) + "\n")

    def table(self) -> str:
        """A Markdown table: key | median | min | max | target | pass (notes below it)."""
        rows = [["key", "median", "min", "max", "target", "pass"]]
        notes: list[str] = []
        for f in self.figures:
            if f.available:
                verdict = "-" if f.passed is None else "yes" if f.passed else "NO"
                rows.append([f.key, _num(f.median), _num(min(f.samples)), _num(max(f.samples)),
                             f.target_text, verdict])
            else:
                rows.append([f.key, "n/a", "", "", f.target_text, "n/a"])
            if f.note:
                notes.append(f"- {f.key}: {f.note}")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [_row(rows[0], widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += [_row(r, widths) for r in rows[1:]]
        return "\n".join(lines + ([""] + notes if notes else []))


def _row(cells: Iterable[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
