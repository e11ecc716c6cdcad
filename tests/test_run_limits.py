"""A run job's time limit (worker/handlers/run.py `run_limit`, worker/jobs/guard.py): its own
timeout, else MODELQ_MAX_RUN_SECONDS, else none; a job with no limit never times out, and the
one watchdog thread survives watching it (an infinite wait is not a timeout the OS takes)."""

from __future__ import annotations

import math
import threading
import time

from schemas import RunJob
from tasks.settings import Settings
from worker.handlers.run import run_limit
from worker.jobs.guard import GuardHooks, JobGuard, Watchdog


def _job(timeout: float | None = None) -> RunJob:
    return RunJob.model_validate({"task": "modelq.generate", "model": {"model_key": "ab" * 16},
                                  "timeout_seconds": timeout})


def test_a_run_job_runs_under_its_own_timeout_else_the_setting_else_none() -> None:
    assert run_limit(_job(), None) == math.inf
    assert run_limit(_job(), 7200) == 7200
    assert run_limit(_job(90), 7200) == 90
    assert Settings(redis_url="redis://x").max_run_seconds is None  # the default: no limit
    assert Settings(redis_url="redis://x", max_run_seconds=0).max_run_seconds is None
    assert Settings(redis_url="redis://x", max_load_seconds=60).max_run_seconds is None


def test_a_job_with_no_limit_never_times_out_and_the_watchdog_keeps_watching() -> None:
    clock = [0.0]
    guard = JobGuard("forever", _job(), timeout=math.inf, clock=lambda: clock[0],
                     hooks=GuardHooks(report=lambda *_: None, cancel_requested=lambda: False))
    clock[0] = 10.0 ** 9  # 30 years on
    guard.check()
    watchdog, fired = Watchdog(grace=0.05), threading.Event()
    watchdog.watch("forever", math.inf, fired.set)
    time.sleep(0.1)
    watchdog.clear("forever")
    watchdog.watch("stuck", time.monotonic(), fired.set)  # the thread is still there to see it
    assert fired.wait(2)
