"""The training loop: optimizer steps over micro-batches, checkpoints, resume, evaluation.

`TrainingRun` owns one attempt's state (optimizer, schedule, data position, losses) and
can be saved to and restored from a `Checkpoint`, so that an attempt that resumes from
step N continues exactly as the uninterrupted run would have: same weights, optimizer
moments, schedule, RNG and next batch. Cancel and time limits are checked before every
micro-batch. A non-finite loss or gradient stops the run with TaskFailed naming the step.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from schemas.errors import TaskFailed
from worker.training.checkpoints import Checkpoint
from worker.training.data import IGNORE_INDEX, Example, batch_order, collate
from worker.training.options import TrainOptions
from worker.training.schedule import optimizer_for, scheduler_for

TASK = "modelq.train_adapter"


@dataclass
class StepHooks:
    """What the loop reports to and asks of the task around it."""

    check_cancel: Callable[[], None]
    step_done: Callable[[int, dict[str, float]], None]  # (step, metrics) after each optimizer step
    save: Callable[[int], None] | None = None  # (step) when a checkpoint is due


@dataclass
class TrainingRun:
    """One attempt at training `named` (the adapter's parameters, by name) on `examples`."""

    model: Any
    named: list[tuple[str, torch.nn.Parameter]]
    examples: list[Example]
    options: TrainOptions
    pad_id: int
    device: torch.device
    eval_examples: list[Example] | None = None
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0

    def __post_init__(self) -> None:
        opts = self.options
        self.params = [p for _, p in self.named]
        self.optimizer = optimizer_for(self.named, opts.learning_rate, opts.weight_decay)
        self.scheduler = scheduler_for(self.optimizer, opts.lr_scheduler, opts.warmup_steps, opts.steps)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from `checkpoint`: weights, optimizer, schedule, RNG, losses so far."""
        by_name = dict(self.named)
        with torch.no_grad():
            for name, value in checkpoint.weights.items():
                by_name[name].copy_(value.to(by_name[name].device))
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        torch.random.set_rng_state(checkpoint.rng["torch"])
        if "cuda" in checkpoint.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint.rng["cuda"], self.device)
        state = checkpoint.state
        random.setstate(_python_state(state["python_rng"]))
        self.losses = [float(x) for x in state["losses"]][:checkpoint.step]
        self.eval_losses = {k: float(v) for k, v in state.get("eval_losses", {}).items()}
        self.resumed_from = checkpoint.step

    def checkpoint(self, step: int) -> Checkpoint:
        """The state after `step` optimizer steps."""
        rng: dict[str, Any] = {"torch": torch.random.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"micro_batches": step * self.options.gradient_accumulation_steps,
                 "losses": self.losses[:step], "eval_losses": self.eval_losses,
                 "python_rng": _python_json(random.getstate()), "options": self.options.as_json()}
        return Checkpoint(step=step, weights={n: p.detach() for n, p in self.named},
                          optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                          rng=rng, state=state)

    def train(self, hooks: StepHooks) -> None:
        """Steps `resumed_from + 1` .. `options.steps`; a checkpoint every `checkpoint_steps`."""
        opts = self.options
        order = batch_order(len(self.examples), opts.batch_size, opts.seed,
                            skip=self.resumed_from * opts.gradient_accumulation_steps)
        for step in range(self.resumed_from + 1, opts.steps + 1):
            metrics = self._step(step, order, hooks)
            if self.eval_examples is not None and (
                    step == opts.steps or (opts.eval_steps is not None and step % opts.eval_steps == 0)):
                metrics["eval_loss"] = self.eval_losses[str(step)] = self.evaluate(hooks)
            hooks.step_done(step, metrics)
            due = opts.checkpoint_steps and step % opts.checkpoint_steps == 0 and step < opts.steps
            if due and hooks.save is not None:
                hooks.save(step)
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self, step: int, order: Any, hooks: StepHooks) -> dict[str, float]:
        opts, started = self.options, time.monotonic()
        self.optimizer.zero_grad(set_to_none=True)
        loss, tokens = 0.0, 0
        for _ in range(opts.gradient_accumulation_steps):
            hooks.check_cancel()
            batch = collate([self.examples[i] for i in next(order)], self.pad_id, self.device)
            micro = self.model(**batch, use_cache=False).loss / opts.gradient_accumulation_steps
            if not torch.isfinite(micro.detach()).all():
                raise _not_finite("loss", step)
            micro.backward()
            loss += float(micro.detach())
            tokens += int(batch["attention_mask"].sum())
        hooks.check_cancel()
        limit = opts.max_grad_norm if opts.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        if not math.isfinite(grad_norm):
            raise _not_finite("gradient", step)
        rate = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.losses.append(loss)
        seconds = max(time.monotonic() - started, 1e-9)
        return {"loss": loss, "learning_rate": rate, "grad_norm": grad_norm,
                "tokens_per_second": tokens / seconds}

    def evaluate(self, hooks: StepHooks) -> float:
        """Mean loss per trained token over the eval set, in eval mode, without gradients."""
        assert self.eval_examples is not None
        was = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for start in range(0, len(self.eval_examples), self.options.batch_size):
                    hooks.check_cancel()
                    batch = collate(self.eval_examples[start:start + self.options.batch_size],
                                    self.pad_id, self.device)
                    logits = self.model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"], use_cache=False).logits
                    labels = batch["labels"][:, 1:]
                    losses = torch.nn.functional.cross_entropy(
                        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                        reduction="sum")
                    total += float(losses)
                    count += int((labels != IGNORE_INDEX).sum())
        finally:
            for module, mode in was:
                module.training = mode
        return total / max(count, 1)


def _not_finite(what: str, step: int) -> TaskFailed:
    return TaskFailed(f"{TASK}: the {what} is not finite at step {step}; the adapter is not saved "
                      "(lower learning_rate, check the data, or train in float32)",
                      task=TASK, step=step, exception_type="NonFiniteLoss",
                      exception_message=f"non-finite {what} at step {step}")


def _python_json(state: Any) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state(saved: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
