"""How the built-in tasks run a list of inputs in batches, and what every batch shares.

`BatchRunner` sorts the items by length (longest first), cuts them into batches capped by
row count *and* by padded tokens (rows x the longest row), and runs each; a batch that
runs out of memory (`torch.OutOfMemoryError`, or a RuntimeError saying "out of memory")
is split in half and each half retried, down to one row: a job that would finish one
item at a time never fails for batching. After an out-of-memory batch the token cap
drops to half of that batch's padded tokens for the rest of the call.

Also here: the model's arguments that pick each row's adapter (peft's mixed-adapter
inference, `adapter_names=`), left padding, and `seeded` (torch's RNG for a block).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from schemas.errors import InvalidJob
from worker.modeltasks.builtin.encoding import HarnessTokens, model_max_length
from worker.modeltasks.registry import TaskContext

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BATCH_SIZE = 32
"""Rows per batch when a task call names no `batch_size`."""
DEFAULT_BATCH_TOKENS = 32768
"""Padded tokens per batch (rows x longest row, new tokens included) when none is named."""
MAX_BATCH_SIZE = 4096
BASE_ROW = "__base__"  # peft's adapter name for a row that runs on the base alone


def check_batching(batch_size: int | None, max_batch_tokens: int | None) -> tuple[int, int]:
    """The batch size and token cap a call asked for (defaults for None); InvalidJob if bad."""
    size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    tokens = DEFAULT_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
        raise InvalidJob(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, not {batch_size!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InvalidJob(f"max_batch_tokens must be a positive integer, not {max_batch_tokens!r}")
    return size, tokens


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device ran out of memory (CUDA, MPS, or the CPU allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class BatchRunner:
    """Runs `run(rows)` over items in length-sorted batches, halving a batch that runs out of
    memory (see the module docstring). `lengths[i]` is item i's padded cost per row."""

    def __init__(self, lengths: Sequence[int], batch_size: int, max_tokens: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def batches(self) -> Iterator[list[int]]:
        """Item indices, longest first, cut by row count and padded tokens (a row over the token
        cap runs alone). Reads `max_tokens` as it goes: a lowered cap applies at once."""
        order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
        batch: list[int] = []
        for index in order:
            longest = self.lengths[batch[0]] if batch else self.lengths[index]
            if batch and (len(batch) >= self.batch_size or longest * (len(batch) + 1) > self.max_tokens):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def run(self, run: Callable[[list[int]], Sequence[T]]) -> list[T]:
        """Each item's result, in the items' order."""
        results: dict[int, T] = {}
        for batch in self.batches():
            results.update(self._split_on_oom(batch, run))
        return [results[i] for i in range(len(self.lengths))]

    def _split_on_oom(self, rows: list[int], run: Callable[[list[int]], Sequence[T]]) -> dict[int, T]:
        try:
            return dict(zip(rows, run(rows), strict=True))
        except Exception as exc:
            if len(rows) == 1 or not is_out_of_memory(exc):
                raise
            padded = max(self.lengths[i] for i in rows) * len(rows)
            log.warning("a batch of %d rows (%d padded tokens) ran out of memory: splitting it",
                        len(rows), padded)
        _free_memory()  # outside the except block: the traceback's tensors are gone by now
        self.max_tokens = min(self.max_tokens, max(padded // 2, 1))
        half = len(rows) // 2
        return {**self._split_on_oom(rows[:half], run), **self._split_on_oom(rows[half:], run)}


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def adapter_arguments(ctx: TaskContext, items: int) -> Callable[[list[int]], dict[str, Any]]:
    """The keyword arguments that give each row of a batch its adapter: nothing when every item
    runs with the call's active adapters, else peft's `adapter_names` (one per row)."""
    names = ctx.row_adapters
    if names is None:
        return lambda rows: {}
    if len(names) != items:
        raise InvalidJob(f"row_adapters names {len(names)} adapters for {items} items")
    if all(name == BASE_ROW for name in names) and not isinstance(ctx.model, PeftModel):
        return lambda rows: {}
    if not isinstance(ctx.model, PeftModel):
        raise InvalidJob("rows ask for adapters, but the model has no adapters: attach them first")
    missing = sorted({n for n in names if n != BASE_ROW and n not in ctx.model.peft_config})
    if missing:
        raise InvalidJob(f"the model has no adapter named {', '.join(map(repr, missing))}",
                         adapters=missing)
    return lambda rows: {"adapter_names": [names[i] for i in rows]}


def harness_tokens(ctx: TaskContext) -> HarnessTokens:
    """The model's tokenizer, used as lm-evaluation-harness's HFLM uses it, with the model's length."""
    tokenizer = ctx.tokenizer
    try:
        return HarnessTokens(tokenizer, model_max_length(ctx.model, tokenizer))
    except ValueError as exc:
        raise InvalidJob(f"model {ctx.model_key}: {exc}") from None


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding takes: the tokenizer's pad token, else its EOS, else 0 (never attended)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def left_padded(rows: Sequence[Sequence[int]], pad: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows` padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Seed torch's generators for the block, leaving the process's own random state as it was."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
