"""Test hooks that make worker faults happen on cue; inert unless a test setting turns them on.

Two settings drive them (tasks/settings.py), and production leaves both unset:

- `MODELQ_TEST_STAGE_DELAY=STAGE:SECONDS` pauses every job for SECONDS on entering
  STAGE (e.g. `loading:5`), ticking progress as a slow weight load would, so a
  test can `kill -9`, SIGTERM, cancel or time out a worker "mid-load" on purpose.
- `MODELQ_TEST_FAULTS=1` lets a job whose model or adapter reference contains a
  marker fault on entering the `loading` stage:
  `modelq-fault-kill` SIGKILLs the worker (a job that kills its worker every time);
  `modelq-fault-cuda` raises the error a poisoned CUDA context raises.

This module only injects faults; it never handles them (that is worker/runner.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from schemas import AttachAdapterJob, LoadJob, Stage, UnloadJob
from tasks.settings import Settings
from worker.progress import Reporter

log = logging.getLogger(__name__)

KILL_MARKER = "modelq-fault-kill"
CUDA_MARKER = "modelq-fault-cuda"
CUDA_ERROR = "CUDA error: an illegal memory access was encountered (injected by MODELQ_TEST_FAULTS)"


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
    def from_settings(cls, settings: Settings) -> Faults:
        faults = cls(settings.test_stage_delay, settings.test_faults)
        if faults.active:
            log.warning("TEST HOOKS ON (stage delay %r, fault markers %s): not for production",
                        settings.test_stage_delay, faults.enabled)
        return faults

    @property
    def active(self) -> bool:
        return self.enabled or self.delay_stage is not None

    def on_stage(self, job: LoadJob | AttachAdapterJob | UnloadJob, stage: Stage,
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


def _refs(job: LoadJob | AttachAdapterJob | UnloadJob) -> str:
    if isinstance(job, LoadJob):
        return " ".join([job.model.display, *(a.ref.display for a in job.adapters)])
    if isinstance(job, AttachAdapterJob):
        return job.adapter.display
    return ""
