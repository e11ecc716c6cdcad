"""Built-in `modelq.train_adapter`: train one LoRA adapter on the frozen base, from a JSON-lines file.

Only the named adapter's parameters get gradients and an optimizer: the base
(bf16, fp32 or a 4-bit QLoRA base) and every other adapter stay byte-for-byte as
they were. peft's `prepare_model_for_kbit_training` is not used, because it casts
the base's non-quantized weights to float32. Which parameters require grad, which
modules are in train mode and which adapters are active are put back afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from schemas.errors import InvalidJob
from worker.modeltasks.activation import adapter_parameters, adapter_state, restore, set_active
from worker.modeltasks.builtin.batching import seeded
from worker.modeltasks.builtin.lora import require_adapter, write_adapter
from worker.modeltasks.registry import TaskContext, model_task

IGNORE_INDEX = -100  # labels the loss skips (padding)


@model_task("modelq.train_adapter")
def train_adapter(ctx: TaskContext, adapter: str, dataset: str, steps: int, batch_size: int = 4,
                  learning_rate: float = 1e-4, max_length: int = 512, gradient_accumulation_steps: int = 1,
                  seed: int = 0, output_dir: str | None = None) -> dict[str, Any]:
    """Train adapter `adapter` for `steps` optimizer steps on the "text" of each line of `dataset`."""
    _check_numbers(steps=steps, batch_size=batch_size, max_length=max_length,
                   gradient_accumulation_steps=gradient_accumulation_steps)
    if not learning_rate > 0:
        raise InvalidJob(f"learning_rate must be positive, not {learning_rate!r}")
    plain, adapter = adapter, ctx.adapter_name(adapter)  # the name on the model (tenants)
    model = require_adapter(ctx.model, adapter)
    texts = read_texts(ctx.resolve_path(dataset, for_writing=False))
    folder = None if output_dir is None else ctx.resolve_path(output_dir, for_writing=True)
    tokenizer = ctx.tokenizer
    losses: list[float] = []
    with training(model, adapter) as params, seeded(ctx.device, seed):
        optimizer = torch.optim.AdamW(params, lr=learning_rate)
        batches = batch_indices(len(texts), batch_size, seed)
        for step in range(1, steps + 1):
            ctx.check_cancel()
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for _ in range(gradient_accumulation_steps):
                batch = encode_batch(tokenizer, [texts[i] for i in next(batches)], max_length, ctx.device)
                micro = model(**batch).loss / gradient_accumulation_steps
                micro.backward()
                loss += float(micro.detach())
            optimizer.step()
            losses.append(loss)
            ctx.progress(step, steps, {"loss": loss})
        optimizer.zero_grad(set_to_none=True)
    if folder is not None:
        write_adapter(model, adapter, folder, base_model=ctx.base_model)
    return {"adapter": plain, "losses": losses, "output_dir": None if folder is None else str(folder)}


def _check_numbers(**numbers: Any) -> None:
    for name, value in numbers.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidJob(f"{name} must be a positive integer, not {value!r}")


@contextmanager
def training(model: torch.nn.Module, adapter: str) -> Iterator[list[torch.nn.Parameter]]:
    """Only `adapter` active and trainable, modules in train mode; all put back on the way out."""
    grads = {id(p): (p, p.requires_grad) for p in model.parameters()}
    modes = [(module, module.training) for module in model.modules()]
    adapters = adapter_state(model)
    params = adapter_parameters(model, adapter)
    if not params:
        raise InvalidJob(f"adapter {adapter!r} has no parameters to train")
    try:
        set_active(model, (adapter,))
        for parameter, _ in grads.values():
            parameter.requires_grad_(False)
        for parameter in params:
            parameter.requires_grad_(True)
        model.train()
        yield params
    finally:
        for parameter in params:
            parameter.grad = None
        restore(model, adapters)
        for parameter, flag in grads.values():
            parameter.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


def read_texts(path: Path) -> list[str]:
    """The "text" of each non-blank line of a JSON-lines file; InvalidJob says which line is wrong."""
    if not path.is_file():
        raise InvalidJob(f"dataset {path} is not a file: give a JSON-lines file of {{\"text\": ...}}",
                         path=str(path))
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidJob(f"dataset {path} line {number} is not JSON ({exc.msg})",
                                 path=str(path)) from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InvalidJob(f"dataset {path} line {number} must be an object with a string \"text\"",
                                 path=str(path))
            texts.append(row["text"])
    if not texts:
        raise InvalidJob(f"dataset {path} holds no lines", path=str(path))
    return texts


def batch_indices(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into `count` examples: each pass over them in a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(torch.randperm(count, generator=generator).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (padding ignored by the loss)."""
    rows = [list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]) for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, :len(row)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
