"""Built-in inference tasks: `modelq.generate` and `modelq.loglikelihood`.

Both run one prompt (one request) at a time, so their numbers are exactly what
the same call on the model in process gives: no padding enters a forward pass.
Adapter tasks (add, train, save) are in worker/modeltasks/builtin/lora.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from schemas.errors import InvalidJob
from worker.modeltasks.registry import TaskContext, model_task

Request = str | Sequence[str]


@model_task("modelq.generate", batchable=True)
def generate(ctx: TaskContext, prompts: str | list[str], max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             stop: str | list[str] | None = None) -> list[str]:
    """Complete each prompt; the continuations alone, cut at the first stop string."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidJob("prompts must be a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise InvalidJob("stop must be a non-empty string or a list of them")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidJob(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise InvalidJob("sampling needs temperature > 0 and 0 < top_p <= 1")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample)}
    if do_sample:
        options.update(temperature=float(temperature), top_p=float(top_p))
    tokenizer = ctx.tokenizer
    with seeded(ctx.device, seed):
        rows = ctx.row_adapters or (None,) * len(texts)  # mixed adapters: one per prompt
        return [_generate_one(ctx, tokenizer, text, {**options, "adapter_names": [row]}
                              if row is not None else options, stops)
                for text, row in zip(texts, rows, strict=True)]


def _generate_one(ctx: TaskContext, tokenizer: PreTrainedTokenizerBase, text: str,
                  options: dict[str, Any], stops: list[str]) -> str:
    ctx.check_cancel()
    encoded = tokenizer(text, return_tensors="pt").to(ctx.device)
    start = encoded["input_ids"].shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    watch = StoppingCriteriaList([_WatchEachToken(ctx, tokenizer, start, stops)])
    model: Any = ctx.model
    output = model.generate(**encoded, stopping_criteria=watch, pad_token_id=pad, **options)
    completion = str(tokenizer.decode(output[0, start:], skip_special_tokens=True))
    return cut_at_stop(completion, stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest of `stops` (all of it when none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(found)] if found else text


class _WatchEachToken(StoppingCriteria):
    """After each new token: raise if the job was cancelled; stop once a stop string shows."""

    def __init__(self, ctx: TaskContext, tokenizer: PreTrainedTokenizerBase, start: int,
                 stops: list[str]) -> None:
        self.ctx, self.tokenizer, self.start, self.stops = ctx, tokenizer, start, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        self.ctx.check_cancel()
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stops:
            for row in range(input_ids.shape[0]):
                text = self.tokenizer.decode(input_ids[row, self.start:], skip_special_tokens=True)
                done[row] = any(s in text for s in self.stops)
        return done  # type: ignore[return-value]


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


@model_task("modelq.loglikelihood", batchable=True)
def loglikelihood(ctx: TaskContext, requests: list[Request]) -> list[dict[str, float | int]]:
    """Log-probability of each text (from its second token), or of a continuation given its context."""
    if not isinstance(requests, list):
        raise InvalidJob("requests must be a list of strings or [context, continuation] pairs")
    tokenizer = ctx.tokenizer
    results: list[dict[str, float | int]] = []
    for index, request in enumerate(requests):
        ctx.check_cancel()
        ids, scored = encode_request(tokenizer, request, index)
        row = ctx.row_adapters[index] if ctx.row_adapters is not None else None
        results.append({"logprob": score(ctx, ids, scored, row), "tokens": scored})
    return results


def encode_request(tokenizer: PreTrainedTokenizerBase, request: Request,
                   index: int = 0) -> tuple[list[int], int]:
    """The token ids of a request, and how many of the last ones are scored."""
    if isinstance(request, str):
        ids = list(tokenizer(request)["input_ids"])
        return ids, max(len(ids) - 1, 0)
    if isinstance(request, (list, tuple)) and len(request) == 2 and all(isinstance(r, str) for r in request):
        context = list(tokenizer(request[0])["input_ids"])
        continuation = list(tokenizer(request[1], add_special_tokens=False)["input_ids"])
        ids = context + continuation
        return ids, min(len(continuation), max(len(ids) - 1, 0))
    raise InvalidJob(f"requests[{index}] must be a string or a [context, continuation] pair of strings")


def score(ctx: TaskContext, ids: list[int], scored: int, adapter: str | None = None) -> float:
    """Sum of log p(token | the tokens before it) over the last `scored` tokens, in float32."""
    if scored == 0:
        return 0.0
    model: Any = ctx.model
    input_ids = torch.tensor([ids], device=ctx.device)
    with torch.no_grad():
        rows = {} if adapter is None else {"adapter_names": [adapter]}
        logits = model(input_ids=input_ids, **rows).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = input_ids[0, 1:].unsqueeze(-1)
    return float(logprobs.gather(-1, targets).squeeze(-1)[-scored:].sum())
