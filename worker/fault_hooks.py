"""Test hooks that make worker faults happen on cue; inert unless a test setting turns them on.

`FaultSettings` (prefix MODELQ_TEST_, read only by the worker at start, apart from the
production Settings) drives them, and production leaves all of it unset:

- `MODELQ_TEST_STAGE_DELAY=STAGE:SECONDS` pauses every job for SECONDS on entering
  STAGE (e.g. `loading:5`), ticking progress as a slow weight load would, so a
  test can `kill -9`, SIGTERM, cancel or time out a worker "mid-load" on purpose.
- `MODELQ_TEST_FAULTS=1` lets a job whose model or adapter reference contains a
  marker fault on entering the `loading` stage:
  `modelq-fault-kill` SIGKILLs the worker (a job that kills its worker every time);
  `modelq-fault-cuda` raises the error a poisoned CUDA context raises.
- `MODELQ_TEST_FAIL_ALLOC=N` makes the first N cold loads of the worker raise
  MemoryError, standing in for an allocation failure (`AllocationFaults`).

The hooks add a fault to the path a job takes anyway; they never choose the path. They
act where a job enters a stage (worker/jobs/guard.py) or allocates (worker/models/admission.py),
so a load the cache serves at once (worker/jobs/runner.py's fast path) enters no stage and
meets no hook, with the hooks on as with them off.

This module only injects faults; it never handles them (that is worker/jobs/runner.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import AttachAdapterJob, LoadJob, Stage
from schemas.jobs import Job
from worker.jobs.progress import Reporter

log = logging.getLogger(__name__)

KILL_MARKER = "modelq-fault-kill"
CUDA_MARKER = "modelq-fault-cuda"
CUDA_ERROR = "CUDA error: an illegal memory access was encountered (injected by MODELQ_TEST_FAULTS)"


class FaultSettings(BaseSettings):
    """The test hooks' configuration: off unless a MODELQ_TEST_* variable sets it."""

    model_config = SettingsConfigDict(env_prefix="MODELQ_TEST_", frozen=True, extra="ignore")

    stage_delay: str = ""
    """'STAGE:SECONDS' pauses every job on entering STAGE, ticking progress (e.g. 'loading:5')."""

    faults: bool = False
    """Lets a model path containing a fault marker kill its worker or poison its CUDA context."""

    fail_alloc: int = Field(default=0, ge=0)
    """The first N cold loads of the worker fail as an allocation failure would."""

    @property
    def active(self) -> bool:
        return bool(self.stage_delay or self.faults or self.fail_alloc)


class AllocationFaults:
    """Injected allocation failures: the next `remaining` load attempts fail."""

    def __init__(self, remaining: int = 0) -> None:
        self.remaining = remaining

    def check(self) -> None:
        if self.remaining > 0:
            self.remaining -= 1
            raise MemoryError("injected allocation failure (MODELQ_TEST_FAIL_ALLOC)")


class Faults:
    """The hooks one worker applies when a job enters a stage."""

    def __init__(self, stage_delay: str = "", enabled: bool = False) -> None:
        self.delay_stage: Stage | None = None
        self.delay_seconds = 0.0
        if stage_delay:
            stage, _, seconds = stage_delay.partition(":")
            self.delay_stage, self.delay_seconds = Stage(stage), float(seconds or 0)
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings: FaultSettings) -> Faults:
        if settings.active:
            log.warning("TEST HOOKS ON (stage delay %r, fault markers %s, failed allocations %d): "
                        "not for production", settings.stage_delay, settings.faults,
                        settings.fail_alloc)
        return cls(settings.stage_delay, settings.faults)

    def on_stage(self, job: Job, stage: Stage,
                 reporter: Reporter) -> None:
        """Apply the hooks for `job` entering `stage` (after its stage event was written)."""
        if self.enabled and stage is Stage.loading:
            ref = _refs(job)
            if KILL_MARKER in ref:
                log.warning("test fault: killing this worker (pid %d) on %s", os.getpid(), ref)
                os.kill(os.getpid(), signal.SIGKILL)
            if CUDA_MARKER in ref:
                import torch

                raise torch.AcceleratorError(CUDA_ERROR)
        if stage is self.delay_stage and self.delay_seconds > 0:
            self._pause(reporter)

    def _pause(self, reporter: Reporter) -> None:
        """Sleep in small steps, reporting progress (where cancels and timeouts are noticed)."""
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < self.delay_seconds:
            reporter.progress(elapsed, self.delay_seconds, unit="s")
            time.sleep(min(0.05, self.delay_seconds - elapsed))
        reporter.progress(self.delay_seconds, self.delay_seconds, unit="s")


def _refs(job: Job) -> str:
    if isinstance(job, LoadJob):
        return " ".join([job.model.display, *(a.ref.display for a in job.adapters)])
    if isinstance(job, AttachAdapterJob):
        return job.adapter.display
    return ""
