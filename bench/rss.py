"""A process's resident memory from /proc (Linux): current, peak, and resetting the peak.

Writing '5' to /proc/<pid>/clear_refs resets VmHWM to the current RSS, so the
peak read after a job is that job's own (the kernel allows it for our own children).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Memory:
    """VmRSS and VmHWM of one process, in bytes."""

    rss: int
    peak: int


def read(pid: int) -> Memory:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024  # kB
    return Memory(rss=fields["VmRSS"], peak=fields["VmHWM"])


def reset_peak(pid: int) -> Memory:
    """Reset the high-water mark to the current RSS; the memory just after."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return read(pid)
