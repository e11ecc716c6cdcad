"""modelq worker runtime: the only layer that imports torch, transformers, peft, bitsandbytes.

`from worker import model_task, TaskContext` is how a user's task module registers
tasks; those names are imported on first use, so importing `worker` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.modeltasks.registry import (
        TaskContext,
        TaskHooks,
        TaskOutcome,
        TaskRegistry,
        call_task,
        import_task_modules,
        model_task,
    )

__all__ = ["TaskContext", "TaskHooks", "TaskOutcome", "TaskRegistry", "call_task", "import_task_modules",
           "model_task"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker.modeltasks import registry as model_tasks

        return getattr(model_tasks, name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
