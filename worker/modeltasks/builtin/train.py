"""Built-in `modelq.train_adapter`: train one LoRA adapter on the frozen base, resumably.

A job may bring its adapter's LoraConfig (`lora={...}`) so that it holds everything it
needs: the adapter is created from it, its initial weights drawn from the job's `seed`.
Every `checkpoint_steps` the full state goes to the job's checkpoint folder
(worker/training/checkpoints.py), keyed by tenant and job id under MODELQ_CHECKPOINT_DIR;
the job's next attempt, on any worker that sees that folder, continues from the newest one.
Only the named adapter's parameters get gradients: the base (bf16, fp32 or 4-bit) and every
other adapter stay byte for byte as they were (worker/training/kbit.py says how, and why
QLoRA on a base that had served inference learned nothing before).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

from schemas.errors import InvalidJob
from worker.modeltasks.activation import adapter_parameters
from worker.modeltasks.builtin.lora import (
    check_name,
    create_adapter,
    lora_config,
    require_adapter,
    write_adapter,
)
from worker.modeltasks.builtin.padded_batches import seeded
from worker.modeltasks.registry import TaskContext, model_task
from worker.training.checkpoints import CheckpointStore
from worker.training.data import encode_rows, read_rows
from worker.training.kbit import base_for_training, quantized_4bit, training
from worker.training.loop import StepHooks, TrainingRun
from worker.training.options import TrainOptions
from worker.training.report import TensorBoard

log = logging.getLogger(__name__)
SINGLE_TENANT = "_"  # the checkpoint subfolder of a single-tenant pool's jobs


@model_task("modelq.train_adapter", changes_adapters=True)  # it may add its adapter
def train_adapter(ctx: TaskContext, adapter: str, dataset: str, steps: int, batch_size: int = 4,
                  learning_rate: float = 1e-4, max_length: int = 512, gradient_accumulation_steps: int = 1,
                  seed: int = 0, output_dir: str | None = None, lora: dict[str, Any] | None = None,
                  lr_scheduler: str = "constant", warmup_steps: int = 0, max_grad_norm: float = 1.0,
                  weight_decay: float = 0.0, gradient_checkpointing: bool | None = None,
                  eval_dataset: str | None = None, eval_steps: int | None = None,
                  checkpoint_steps: int = 50, keep_checkpoints: int = 2,
                  keep_checkpoints_after: bool = False, checkpoint_dir: str | None = None,
                  report_to: str | None = None, logging_dir: str | None = None) -> dict[str, Any]:
    """Train adapter `adapter` (made from `lora` if given) for `steps` steps on a JSON-lines dataset."""
    options = TrainOptions(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
        gradient_accumulation_steps=gradient_accumulation_steps, seed=seed, lr_scheduler=lr_scheduler,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
        gradient_checkpointing=gradient_checkpointing, eval_steps=eval_steps,
        checkpoint_steps=checkpoint_steps, keep_checkpoints=keep_checkpoints,
        keep_checkpoints_after=keep_checkpoints_after, report_to=report_to)
    plain, name = check_name(adapter), ctx.adapter_name(adapter)  # the name on the model (tenants)
    config = None if lora is None else lora_config(lora)
    examples, dropped = encode_rows(ctx.tokenizer, read_rows(ctx.resolve_path(dataset)),
                                    options.max_length, f"dataset {str(dataset)[:200]}")
    evals = None if eval_dataset is None else encode_rows(
        ctx.tokenizer, read_rows(ctx.resolve_path(eval_dataset)), options.max_length,
        f"eval_dataset {str(eval_dataset)[:200]}")[0]
    folder = None if output_dir is None else ctx.resolve_path(output_dir, for_writing=True)
    store = _store(ctx, checkpoint_dir, options)
    checkpoint = store.latest() if store is not None else None
    named = _adapter(ctx, name, config, options.seed, store)
    board_dir = _board_dir(ctx, options, logging_dir, folder, store)
    run = TrainingRun(ctx.model, named, examples, options, _pad_id(ctx), ctx.device, evals)
    model = ctx.model
    checkpointing = options.gradient_checkpointing
    if checkpointing is None:
        checkpointing = bool(quantized_4bit(model))
    params = [p for _, p in named]
    with _kept_on_failure(params, config is None):
        with training(model, params, name), base_for_training(model, checkpointing=checkpointing), \
                seeded(ctx.device, options.seed):
            if checkpoint is not None:
                run.restore(checkpoint)
                log.info("training %s resumes from step %d (%s)", name, checkpoint.step,
                         store and store.folder)
            _train(ctx, run, store, board_dir)
        if folder is not None:
            write_adapter(model, name, folder, base_model=ctx.base_model)
    if store is not None and not options.keep_checkpoints_after:
        store.remove()
    return {"adapter": plain, "losses": run.losses, "output_dir": None if folder is None else str(folder),
            "resumed_from_step": run.resumed_from, "steps": options.steps, "eval_losses": run.eval_losses,
            "checkpoint_dir": None if store is None else str(store.folder), "dropped_rows": dropped}


@contextmanager
def _kept_on_failure(params: list[torch.nn.Parameter], existed: bool) -> Iterator[None]:
    """An adapter that was there before the job gets its weights back when the job fails
    (a non-finite loss, cancel, time limit, a failed save): the jobs using it afterwards see it
    as it was, not half trained. One copy of its weights, on its device, for the job's length.
    (An adapter the job made is deleted by the rollback of a failed task: handlers/rollback.py.)"""
    saved = [p.detach().clone() for p in params] if existed else None
    try:
        yield
    except BaseException:
        if saved is not None:
            with torch.no_grad():
                for param, value in zip(params, saved, strict=True):
                    param.copy_(value)
        raise


def _train(ctx: TaskContext, run: TrainingRun, store: CheckpointStore | None, board_dir: Path | None) -> None:
    boards = [] if board_dir is None else [TensorBoard(board_dir, run.resumed_from + 1)]
    total = run.options.steps

    def step_done(step: int, metrics: dict[str, float]) -> None:
        ctx.progress(step, total, metrics)
        for board in boards:
            board.step(step, metrics)

    def save(step: int) -> None:
        assert store is not None
        store.save(run.checkpoint(step))
        for board in boards:
            board.flush()  # on disk with the checkpoint: what a resume keeps

    try:
        run.train(StepHooks(check_cancel=ctx.check_cancel, step_done=step_done,
                            save=None if store is None else save))
    finally:
        for board in boards:
            board.close()


def _store(ctx: TaskContext, checkpoint_dir: str | None, options: TrainOptions) -> CheckpointStore | None:
    """The job's checkpoint folder: the one it names (under the tenant's roots), else
    MODELQ_CHECKPOINT_DIR/<tenant>/<job id>; None without a job id or with checkpoint_steps=0."""
    if options.checkpoint_steps == 0:
        return None
    if checkpoint_dir is not None:
        return CheckpointStore(ctx.resolve_path(checkpoint_dir, for_writing=True), options.keep_checkpoints)
    root = ctx.hooks.checkpoint_dir
    if root is None or not ctx.job_id:
        return None
    job = re.sub(r"[^A-Za-z0-9._-]", "_", ctx.job_id)[:200]
    return CheckpointStore(Path(root) / (ctx.tenant or SINGLE_TENANT) / job, options.keep_checkpoints)


def _adapter(ctx: TaskContext, name: str, config: LoraConfig | None, seed: int,
             store: CheckpointStore | None) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's parameters by name: the model's own adapter, or one made from `config`
    (made again with the same seed by a later attempt of the same job on this worker)."""
    model = ctx.model
    exists = isinstance(model, PeftModel) and name in model.peft_config
    if config is None:
        require_adapter(model, name)
    elif exists and (store is None or not store.folder.is_dir()):
        raise InvalidJob(f"the model has an adapter named {name!r} already: leave 'lora' out to train "
                         "it, or pick another name", name=name)
    elif exists:
        with seeded(ctx.device, seed):
            for module in model.modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    module.reset_lora_parameters(name, config.init_lora_weights)  # type: ignore[no-untyped-call]
    else:
        with seeded(ctx.device, seed):
            create_adapter(ctx, name, config)
    if store is not None:
        store.folder.mkdir(parents=True, exist_ok=True)  # marks the adapter as this job's own
    mine = {id(p) for p in adapter_parameters(ctx.model, name)}
    named = [(n, p) for n, p in ctx.model.named_parameters() if id(p) in mine]
    if not named:
        raise InvalidJob(f"adapter {name!r} has no parameters to train")
    return named


def _board_dir(ctx: TaskContext, options: TrainOptions, logging_dir: str | None, folder: Path | None,
               store: CheckpointStore | None) -> Path | None:
    if options.report_to is None:
        return None
    if logging_dir is not None:
        return ctx.resolve_path(logging_dir, for_writing=True)
    base = folder if folder is not None else (store.folder if store is not None else None)
    if base is None:
        raise InvalidJob("report_to='tensorboard' needs a folder for its event files: give "
                         "logging_dir (or output_dir, whose runs/ subfolder is used)")
    return base / "runs"


def _pad_id(ctx: TaskContext) -> int:
    tokenizer = ctx.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
