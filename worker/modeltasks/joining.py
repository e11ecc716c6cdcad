"""One call of a batchable task for several jobs: their lists joined, its result split back.

A batchable task (``@model_task(..., batchable=True)``) takes a list as its first argument
and returns one result per item. Jobs of it may share a call when every other argument is
equal (`split_args` gives the key that says so); `joined_arguments` builds the shared
call's arguments, `split_values` cuts its result into each job's part. A first argument
given as a string counts as a one-item list, as the built-in tasks read it.

`mixable` says which adapters of a model may serve different rows of one call through
peft's mixed-adapter inference (`adapter_names=`, "__base__" for none): LoRA adapters
without DoRA, on a model in eval mode with nothing merged (what peft refuses otherwise).
No Redis, no records here.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from schemas.errors import ResultTooLarge, TaskFailed
from worker.modeltasks.registry import TaskSpec

BASE = "__base__"
"""peft's name for a row that runs on the base model alone (no adapter)."""


@dataclass(frozen=True)
class Split:
    """A job's arguments to a batchable task: its items, and the rest by parameter name."""

    items: list[Any]
    rest: dict[str, Any]
    key: str  # the rest as canonical JSON: jobs with equal keys may share a call
    param: str  # the items' parameter


def split_args(spec: TaskSpec, args: Sequence[Any], kwargs: dict[str, Any]) -> Split | None:
    """The job's items and other arguments; None when they don't bind to the task, or the
    first argument is not a list (or a string): then the job runs alone, as it would."""
    signature = inspect.signature(spec.fn)
    params = list(signature.parameters.values())
    if len(params) < 2 or params[1].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                 inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    items = bound.arguments.get(params[1].name)
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        return None
    rest = {name: value for name, value in bound.arguments.items()
            if name not in (params[0].name, params[1].name)}
    try:
        key = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # a default that is not JSON: alone
        return None
    return Split(items, rest, key, params[1].name)


def joined_arguments(spec: TaskSpec, splits: Sequence[Split]) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) of the shared call: every job's items in order, the others as the
    first job gave them (equal for all, by their key)."""
    signature = inspect.signature(spec.fn)
    first = splits[0]
    ctx_name = next(iter(signature.parameters))
    arguments = {ctx_name: None, first.param: [item for s in splits for item in s.items],
                 **first.rest}
    ordered = {name: arguments[name] for name in signature.parameters if name in arguments}
    bound = inspect.BoundArguments(signature, ordered)
    return list(bound.args[1:]), dict(bound.kwargs)


def split_values(value: Any, counts: Sequence[int], *, task: str,
                 max_result_bytes: int) -> list[Any]:
    """Each job's part of a shared call's result (a list, one entry per item); TaskFailed
    when the task did not return one result per item, ResultTooLarge (as the part) when a
    job's part is over the limit."""
    total = sum(counts)
    if not isinstance(value, list) or len(value) != total:
        got = f"{len(value)} results" if isinstance(value, list) else type(value).__name__
        message = (f"batchable task {task} returned {got} for {total} items: a batchable task "
                   "returns a list with one result per item of its first argument")
        raise TaskFailed(message, task=task, exception_type="BatchMismatch",
                         exception_message=message)
    parts: list[Any] = []
    start = 0
    for count in counts:
        part: Any = value[start:start + count]
        start += count
        size = len(json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode())
        if size > max_result_bytes:
            part = ResultTooLarge(f"task {task} returned {size} bytes of JSON, over the limit of "
                                  f"{max_result_bytes}: write large outputs to a file and return "
                                  "its path", task=task, size=size, limit=max_result_bytes)
        parts.append(part)
    return parts


def mixable(model: torch.nn.Module) -> frozenset[str]:
    """The adapters of `model` that may serve rows of one call side by side (peft's
    `adapter_names=`); empty when the model can't mix at all (no LoRA, training mode,
    merged weights)."""
    if not isinstance(model, PeftModel) or model.training:
        return frozenset()
    if not isinstance(model.base_model, LoraModel):
        return frozenset()
    if any(getattr(m, "merged", False) for m in model.modules() if isinstance(m, BaseTunerLayer)):
        return frozenset()
    return frozenset(name for name, config in model.peft_config.items()
                     if type(config).__name__ == "LoraConfig" and not getattr(config, "use_dora", False))
