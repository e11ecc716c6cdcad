"""Built-in `modelq.generate`: complete a list of prompts, in batches.

Prompts run in length-sorted batches (padded_batches.py), left-padded with an attention mask;
`batch_size=1` runs them one at a time, unpadded. In float32, greedy results equal the
one-at-a-time results; in bf16/fp16 padding may change the last bits of a logit and so,
rarely, a token (transformers #25921, #29029).

Sampling draws each row's tokens from its own generator, seeded from the job's `seed`, the
prompt's text and how many equal prompts come before it in its job's list (the Gumbel-max
trick on the temperature/top-p scores), so a prompt gets the same stream whatever batch it
lands in, a call shared with other jobs included (`ctx.row_jobs`). Without a seed the rows'
seeds are random.

With `until` or `max_gen_toks` the call follows lm-evaluation-harness's `generate_until`:
`max_gen_toks` new tokens (256 by default), the prompt left-truncated to the model's length
minus those, the text cut at the first `until` string.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from schemas.errors import InvalidJob
from worker.modeltasks.builtin.padded_batches import (
    BatchRunner,
    adapter_arguments,
    check_batching,
    harness_tokens,
    left_padded,
    pad_id,
)
from worker.modeltasks.registry import TaskContext, model_task

HARNESS_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks: generate_until's default
SEED_BITS = 63


@dataclass(frozen=True)
class Sampling:
    """How new tokens are picked: greedy (`seeds` None), or sampled with one seed per item."""

    new_tokens: int
    stops: tuple[str, ...]
    temperature: float = 1.0
    top_p: float = 1.0
    seeds: tuple[int, ...] | None = None


@model_task("modelq.generate", batchable=True)
def generate(ctx: TaskContext, prompts: str | list[str], max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             stop: str | list[str] | None = None, until: str | list[str] | None = None,
             max_gen_toks: int | None = None, batch_size: int | None = None,
             max_batch_tokens: int | None = None) -> list[str]:
    """Complete each prompt; the continuations alone, cut at the first stop (or until) string."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidJob("prompts must be a string or a list of strings")
    stops = _strings(stop, "stop") + _strings(until, "until")
    harness = until is not None or max_gen_toks is not None
    new_tokens = (max_gen_toks if max_gen_toks is not None else HARNESS_MAX_GEN_TOKS) if harness \
        else max_new_tokens
    name = "max_gen_toks" if harness else "max_new_tokens"
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise InvalidJob(f"{name} must be a positive integer, not {new_tokens!r}")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise InvalidJob("sampling needs temperature > 0 and 0 < top_p <= 1")
    size, cap = check_batching(batch_size, max_batch_tokens)
    rows = _encode(ctx, texts, new_tokens, harness)
    sampling = Sampling(new_tokens, tuple(stops), float(temperature), float(top_p),
                        row_seeds(seed, texts, ctx.row_jobs) if do_sample else None)
    adapters = adapter_arguments(ctx, len(texts))
    tokenizer = ctx.tokenizer

    def run(batch: list[int]) -> list[str]:
        ctx.check_cancel()
        return _generate_batch(ctx, tokenizer, [rows[i] for i in batch], sampling,
                               adapters(batch), None if sampling.seeds is None
                               else [sampling.seeds[i] for i in batch])

    return BatchRunner([len(r) + new_tokens for r in rows], size, cap).run(run)


def _strings(value: str | list[str] | None, name: str) -> list[str]:
    found = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(found, list) or not all(isinstance(s, str) and s for s in found):
        raise InvalidJob(f"{name} must be a non-empty string or a list of them")
    return found


def _encode(ctx: TaskContext, texts: list[str], new_tokens: int, harness: bool) -> list[list[int]]:
    """Each prompt's ids; in harness mode left-truncated to leave room for the new tokens."""
    tokens = harness_tokens(ctx)
    limit = tokens.max_length - new_tokens if harness else tokens.max_length
    if limit < 1:
        raise InvalidJob(f"max_gen_toks ({new_tokens}) must be less than the model's length "
                         f"({tokens.max_length})")
    rows = []
    for index, text in enumerate(texts):
        ids = tokens.encode_prompt(text)
        if not ids:
            raise InvalidJob(f"prompts[{index}] encodes to no tokens: give it some text")
        if len(ids) > limit and not harness:
            raise InvalidJob(f"prompts[{index}] is {len(ids)} tokens, over the model's length of "
                             f"{tokens.max_length}: shorten it")
        rows.append(ids[-limit:])
    return rows


def row_seeds(seed: int | None, texts: Sequence[str],
              jobs: Sequence[int] | None = None) -> tuple[int, ...]:
    """One seed per prompt: from (seed, the prompt, its count among equal prompts before it in
    its own job: `jobs`, each prompt's job in a shared call); random for each when `seed` is
    None."""
    if seed is None:
        return tuple(secrets.randbits(SEED_BITS) for _ in texts)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidJob(f"seed must be an integer, not {seed!r}")
    seen: Counter[tuple[int, str]] = Counter()
    seeds = []
    for index, text in enumerate(texts):
        counted = (0 if jobs is None else jobs[index], text)
        digest = hashlib.sha256(f"{seed}\0{seen[counted]}\0{text}".encode()).digest()
        seen[counted] += 1
        seeds.append(int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS))
    return tuple(seeds)


def _generate_batch(ctx: TaskContext, tokenizer: PreTrainedTokenizerBase, rows: list[list[int]],
                    sampling: Sampling, extra: dict[str, Any], seeds: list[int] | None) -> list[str]:
    """One `model.generate` over `rows` (left-padded when more than one)."""
    ids, mask = left_padded(rows, pad_id(tokenizer), ctx.device)
    width = ids.shape[1]
    options: dict[str, Any] = dict(extra)
    if seeds is not None:
        options["logits_processor"] = LogitsProcessorList([
            RowSampler(seeds, sampling.temperature, sampling.top_p, ctx.device)])
    watch = StoppingCriteriaList([_WatchEachToken(ctx, tokenizer, width, list(sampling.stops))])
    model: Any = ctx.model
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.new_tokens,
                            do_sample=False, stopping_criteria=watch, pad_token_id=pad_id(tokenizer),
                            **options)
    texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [cut_at_stop(str(text), sampling.stops) for text in texts]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest of `stops` (all of it when none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(found)] if found else text


class RowSampler(LogitsProcessor):
    """Samples each row from its own generator: temperature and top-p on the scores, then
    Gumbel noise (argmax of scores + Gumbel noise is a draw from softmax(scores)), so that
    `generate` in greedy mode picks the sampled token."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float,
                 device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warped = self.warpers(input_ids, scores.float())
        uniform = torch.stack([torch.rand(warped.shape[-1], generator=g, device=g.device)
                               for g in self.generators]).to(warped.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return warped + gumbel  # type: ignore[return-value]


class _WatchEachToken(StoppingCriteria):
    """After each new token: raise if the job was cancelled; a row stops once a stop string shows."""

    def __init__(self, ctx: TaskContext, tokenizer: PreTrainedTokenizerBase, start: int,
                 stops: list[str]) -> None:
        self.ctx, self.tokenizer, self.start, self.stops = ctx, tokenizer, start, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        self.ctx.check_cancel()
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stops:
            texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
            for row, text in enumerate(texts):
                done[row] = any(s in text for s in self.stops)
        return done  # type: ignore[return-value]
