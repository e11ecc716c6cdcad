"""A user task module for tests (`modelq worker --tasks tests.support.long_tasks`).

`tests.sleep` runs as long as it is told (checking cancel and its deadline between naps)
and, given a marker file, appends one line per start: a test counts the lines to see how
many times the job was started. `tests.wrap_and_fail` changes adapters on purpose and
fails halfway: it wraps the model with a LoRA (or adds one to a PeftModel), then raises.
`tests.add_lora` adds a LoRA and returns (a user task that changes a model it may share).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model

from worker import TaskContext, model_task

LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


@model_task("tests.sleep")
def sleep(ctx: TaskContext, seconds: float, marker: str | None = None) -> dict[str, Any]:
    """Sleep `seconds` (cancel and deadline checked every 0.1 s); one marker line per start."""
    if marker is not None:
        with open(ctx.resolve_path(marker, for_writing=True), "a") as out:
            out.write(f"{os.getpid()} {time.time():.3f}\n")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.check_cancel()
        time.sleep(0.1)
    return {"slept": seconds, "pid": os.getpid()}


def _with_lora(ctx: TaskContext, name: str) -> None:
    config = LoraConfig(**LORA)
    if isinstance(ctx.model, PeftModel):
        ctx.model.add_adapter(ctx.adapter_name(name), config)
    else:
        ctx.model = get_peft_model(ctx.model, config, adapter_name=ctx.adapter_name(name))


@model_task("tests.wrap_and_fail", changes_adapters=True)
def wrap_and_fail(ctx: TaskContext, name: str = "partial") -> None:
    """Add a LoRA `name` to the model, then fail before finishing."""
    _with_lora(ctx, name)
    ctx.model.requires_grad_(True)  # everything trainable, in train mode, as a trainer would
    ctx.model.train()
    raise RuntimeError("failed halfway through changing adapters")


@model_task("tests.add_lora", changes_adapters=True)
def add_lora(ctx: TaskContext, name: str = "mine") -> dict[str, str]:
    """Add a LoRA `name` to the model and keep it."""
    _with_lora(ctx, name)
    return {"added": name}


def marker_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
