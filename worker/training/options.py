"""A training job's options, checked once: what `modelq.train_adapter` takes beyond its data.

Every number has a range and every choice a list, so a bad job fails as InvalidJob before
anything is loaded into the optimizer (and before a checkpoint folder is made).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from schemas.errors import InvalidJob
from worker.training.schedule import SCHEDULES

MAX_STEPS = 10_000_000
MAX_BATCH = 4096
MAX_LENGTH = 1 << 20
REPORT_TO = ("tensorboard",)


@dataclass(frozen=True)
class TrainOptions:
    """How to train: sizes, optimizer, schedule, evaluation, checkpoints, reporting."""

    steps: int
    batch_size: int = 4
    learning_rate: float = 1e-4
    max_length: int = 512
    gradient_accumulation_steps: int = 1
    seed: int = 0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    weight_decay: float = 0.0
    gradient_checkpointing: bool | None = None  # None: on for a 4-bit base
    eval_steps: int | None = None  # None: evaluate at the end only
    checkpoint_steps: int = 50  # 0: no checkpoints
    keep_checkpoints: int = 2
    keep_checkpoints_after: bool = False  # keep the job's checkpoints once it succeeded
    report_to: str | None = None

    def __post_init__(self) -> None:
        _count("steps", self.steps, 1, MAX_STEPS)
        _count("batch_size", self.batch_size, 1, MAX_BATCH)
        _count("max_length", self.max_length, 2, MAX_LENGTH)
        _count("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, MAX_BATCH)
        _count("seed", self.seed, 0, 2**63 - 1)
        _count("warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        _count("checkpoint_steps", self.checkpoint_steps, 0, MAX_STEPS)
        _count("keep_checkpoints", self.keep_checkpoints, 1, 1000)
        if self.eval_steps is not None:
            _count("eval_steps", self.eval_steps, 1, MAX_STEPS)
        _number("learning_rate", self.learning_rate, positive=True)
        _number("max_grad_norm", self.max_grad_norm, positive=False)
        _number("weight_decay", self.weight_decay, positive=False)
        if self.lr_scheduler not in SCHEDULES:
            raise InvalidJob(f"lr_scheduler must be one of {', '.join(SCHEDULES)}, "
                             f"not {str(self.lr_scheduler)[:40]!r}")
        if self.report_to is not None and self.report_to not in REPORT_TO:
            raise InvalidJob(f"report_to must be one of {', '.join(REPORT_TO)} (or left out), "
                             f"not {str(self.report_to)[:40]!r}")
        for name in ("gradient_checkpointing", "keep_checkpoints_after"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise InvalidJob(f"{name} must be true or false, not {str(value)[:40]!r}")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _count(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        kind = "a positive integer" if low == 1 else f"an integer from {low}"
        raise InvalidJob(f"{name} must be {kind} up to {high}, not {str(value)[:40]!r}")


def _number(name: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise InvalidJob(f"{name} must be a {'positive' if positive else 'non-negative'} number, "
                         f"not {str(value)[:40]!r}")
