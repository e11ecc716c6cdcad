"""Built-in scoring tasks: `modelq.loglikelihood` and `modelq.loglikelihood_rolling`.

Scores are lm-evaluation-harness's `HFLM` scores (tokenization in encoding.py): a request's
input is the context and continuation together, left-truncated to the model's length, and
the continuation's log-probability is summed at its positions; `is_greedy` says whether
each continuation token is the argmax there. Both tasks are batchable: requests run in
length-sorted batches (padded_batches.py), left-padded with an attention mask and explicit
position ids, so each row sees exactly the positions it sees alone. Only the scored
positions' logits leave the model where it can (`logits_to_keep`), and only those are
turned into float32 log-probabilities: never a [tokens, vocab] float32 matrix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from schemas.errors import InvalidJob
from worker.modeltasks.builtin.encoding import HarnessTokens, Window
from worker.modeltasks.builtin.padded_batches import (
    BatchRunner,
    adapter_arguments,
    check_batching,
    harness_tokens,
    left_padded,
    pad_id,
)
from worker.modeltasks.registry import TaskContext, model_task

Request = str | Sequence[str]
Score = tuple[float, bool]


@model_task("modelq.loglikelihood", batchable=True)
def loglikelihood(ctx: TaskContext, requests: list[Request], batch_size: int | None = None,
                  max_batch_tokens: int | None = None) -> list[dict[str, float | int | bool]]:
    """Log-probability of each [context, continuation] pair (a lone string: its context is ""),
    as lm-evaluation-harness's HFLM computes it: {"logprob", "tokens", "is_greedy"} each."""
    if not isinstance(requests, list):
        raise InvalidJob("requests must be a list of strings or [context, continuation] pairs")
    size, cap = check_batching(batch_size, max_batch_tokens)
    tokens = harness_tokens(ctx)
    windows = [_pair_window(tokens, request, index) for index, request in enumerate(requests)]
    scores = score_windows(ctx, windows, len(requests), size, cap)
    return [{"logprob": lp, "tokens": len(w.continuation), "is_greedy": greedy}
            for w, (lp, greedy) in zip(windows, scores, strict=True)]


@model_task("modelq.loglikelihood_rolling", batchable=True)
def loglikelihood_rolling(ctx: TaskContext, requests: list[str], batch_size: int | None = None,
                          max_batch_tokens: int | None = None) -> list[dict[str, float | int]]:
    """Log-probability of each whole document, over HFLM's rolling windows (every token scored
    once, for perplexity): {"logprob", "tokens"} each."""
    if not isinstance(requests, list) or not all(isinstance(r, str) for r in requests):
        raise InvalidJob("requests must be a list of strings (documents)")
    size, cap = check_batching(batch_size, max_batch_tokens)
    tokens = harness_tokens(ctx)
    windows = [w for index, text in enumerate(requests) for w in tokens.rolling(text, index)]
    scores = score_windows(ctx, windows, len(requests), size, cap)
    totals = [{"logprob": 0.0, "tokens": 0} for _ in requests]
    for window, (logprob, _) in zip(windows, scores, strict=True):
        total = totals[window.item]
        total["logprob"] += logprob
        total["tokens"] += len(window.continuation)
    return totals


def _pair_window(tokens: HarnessTokens, request: Any, index: int) -> Window:
    if isinstance(request, str):
        request = ["", request]
    if not (isinstance(request, (list, tuple)) and len(request) == 2
            and all(isinstance(r, str) for r in request)):
        raise InvalidJob(f"requests[{index}] must be a string or a [context, continuation] pair of strings")
    context, continuation = tokens.pair(request[0], request[1])
    if len(continuation) > tokens.max_length:
        raise InvalidJob(f"requests[{index}]: the continuation is {len(continuation)} tokens, over the "
                         f"model's length of {tokens.max_length}: score a shorter one")
    return tokens.window(context, continuation, index)


def score_windows(ctx: TaskContext, windows: Sequence[Window], items: int, batch_size: int,
                  max_tokens: int) -> list[Score]:
    """(sum of the continuation's log-probabilities, whether each of its tokens is the argmax)
    for each window; a window with no continuation scores (0.0, True)."""
    adapters = adapter_arguments(ctx, items)
    pad = pad_id(ctx.tokenizer)
    keeps_logits = _takes_logits_to_keep(ctx.model)
    live = [i for i, w in enumerate(windows) if w.continuation]
    runner = BatchRunner([len(windows[i].ids) for i in live], batch_size, max_tokens)

    def run(rows: list[int]) -> list[Score]:
        ctx.check_cancel()
        batch = [windows[live[r]] for r in rows]
        return _forward(ctx.model, ctx.device, batch, pad, keeps_logits,
                        adapters([windows[live[r]].item for r in rows]))

    scores: list[Score] = [(0.0, True)] * len(windows)
    for index, score in zip(live, runner.run(run), strict=True):
        scores[index] = score
    return scores


def _forward(model: Any, device: torch.device, batch: list[Window], pad: int, keeps_logits: bool,
             extra: dict[str, Any]) -> list[Score]:
    """One forward pass over `batch`; each window's score from its last positions' logits."""
    keep = max(len(w.continuation) for w in batch)
    arguments: dict[str, Any] = dict(extra)
    if len(batch) == 1:  # alone: no padding, no mask (as HFLM calls the model)
        arguments["input_ids"] = torch.tensor([batch[0].ids], dtype=torch.long, device=device)
    else:
        ids, mask = left_padded([w.ids for w in batch], pad, device)
        arguments.update(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    if keeps_logits:
        arguments["logits_to_keep"] = keep
    with torch.no_grad():
        logits = model(**arguments).logits[:, -keep:]
    scores = []
    for row, window in enumerate(batch):
        picked = logits[row, keep - len(window.continuation):].float().log_softmax(-1)
        targets = torch.tensor(window.continuation, dtype=torch.long, device=picked.device)
        logprob = float(picked.gather(-1, targets.unsqueeze(-1)).sum())
        scores.append((logprob, bool((picked.argmax(-1) == targets).all())))
    return scores


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can return the last positions' logits alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward: Callable[..., Any] = base.forward
    return "logits_to_keep" in inspect.signature(forward).parameters

