"""Helpers for fault tests and benches: worker settings that make faults quick to see, and waits.

Shared by tests/test_reliability_*.py and bench/reliability.py; nothing here starts processes
(tests/support/workers.py does) or knows key names beyond tasks/state/keys.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from schemas import JobRecord, Stage
from tasks.client import Client
from worker.fault_hooks import CUDA_MARKER, KILL_MARKER

T = TypeVar("T")

VISIBILITY_TIMEOUT = 4
"""Seconds: redelivery after a worker death comes this long (plus a sweep) after delivery."""


def fault_env(stage_delay: str = "", faults: bool = True, **extra: str) -> dict[str, str]:
    """Worker environment: short visibility timeout, optional stage delay, fault markers on."""
    env = {"MODELQ_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT),
           "MODELQ_TEST_FAULTS": "1" if faults else "0", "MODELQ_TEST_STAGE_DELAY": stage_delay}
    env.update(extra)
    return env


def marked_model(model: Path, root: Path, marker: str) -> Path:
    """A symlink to `model` whose path carries a fault marker (KILL_MARKER or CUDA_MARKER)."""
    assert marker in (KILL_MARKER, CUDA_MARKER)
    link = root / f"{marker}-{model.name}"
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    return link


def wait_for(check: Callable[[], T | None], timeout: float = 120, what: str = "condition",
             every: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def wait_stage(client: Client, job_id: str, stage: Stage, timeout: float = 120) -> JobRecord:
    """The record once the job is running in `stage`."""
    def reached() -> JobRecord | None:
        record = client.status(job_id)
        return record if record.stage is stage else None

    return wait_for(reached, timeout, f"job {job_id} to reach {stage.value}")


def resident_copies(client: Client, model_key: str) -> int:
    """How many live workers hold `model_key`."""
    return sum(1 for w in client.workers() if w.holds(model_key))


def started_events(client: Client, job_id: str) -> list[str]:
    """Messages of the job's events that started an attempt."""
    return [e.message or "" for _, e in client.store.events(job_id)
            if e.message and ("started on" in e.message)]
