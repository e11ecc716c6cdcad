"""The optimizer and learning-rate schedule of a run, as transformers' Trainer makes them.

AdamW with weight decay on the adapter's matrices and none on biases or norms; a schedule
of `constant`, `linear` or `cosine` decay after `warmup_steps` of linear warm-up (the
shapes of `transformers.get_scheduler`). Both are plain torch objects whose state_dict a
checkpoint holds.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from schemas.errors import InvalidJob

SCHEDULES = ("constant", "linear", "cosine")


def optimizer_for(named: list[tuple[str, torch.nn.Parameter]], learning_rate: float,
                  weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the adapter's parameters; no decay on 1-d ones (biases, norms)."""
    decay = [p for _, p in named if p.ndim >= 2]
    rest = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=learning_rate)


def scheduler_for(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                  steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule: `kind` after `warmup_steps` of warm-up from 0."""
    if kind not in SCHEDULES:
        raise InvalidJob(f"lr_scheduler must be one of {', '.join(SCHEDULES)}, not {str(kind)[:40]!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_factor, kind, warmup_steps, steps))


def _factor(kind: str, warmup: int, total: int, step: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
