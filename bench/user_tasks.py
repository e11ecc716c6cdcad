"""The user's task module of the bench: `modelq worker --tasks bench.user_tasks`.

`bench.noop` reads the resident model and returns a constant, so its round trip is
all queue: the modelq side of run_overhead_ratio, whose other side is the raw Celery
task `bench.model_noop` (bench/raw_celery.py). Imported by workers only.
"""

from __future__ import annotations

from worker import TaskContext, model_task

NOOP = "bench.noop"


@model_task(NOOP)
def noop(ctx: TaskContext) -> dict[str, bool]:
    """Touches the model, returns a constant."""
    return {"ok": ctx.model is not None}
