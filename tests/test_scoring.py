"""The built-in scoring and generation tasks against lm-evaluation-harness's own `HFLM`, in process.

The reference is lm-eval 0.4.13's HFLM (pretrained=<folder>, cpu, float32) on tiny models with
byte-level BPE tokenizers, one that adds BOS and one that does not: `modelq.loglikelihood`
(contexts ending in a space, empty contexts, inputs over the model's length of 128 tokens),
`modelq.loglikelihood_rolling` and `modelq.generate(until=..., max_gen_toks=...)`, batched and
one at a time.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from schemas import InvalidJob
from tests.support.models import TOKENIZER_LINES, build_bpe_model
from worker.modeltasks.io import TokenizerCache
from worker.modeltasks.registry import TaskContext, TaskHooks, call_task

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")

LIMIT = 1 << 22
LONG = " ".join(TOKENIZER_LINES) * 2  # ~500 tokens, the model takes 128
PAIRS: list[list[str]] = [
    ["the quick brown ", "fox"],  # a trailing space moves to the continuation
    ["the quick brown", " fox"],
    ["", "hello world"],  # an empty context: the prefix token stands in
    ["", "</s> hello"],  # ... unless the continuation starts with it (no-BOS tokenizer)
    ["a cat sat  ", " on the mat"],  # two trailing spaces
    [LONG, " the end"],  # over the model's length: HFLM keeps the last tokens
    ["to be or not to be", " that is the question"],
    ["one two three", " four five six seven eight nine ten"],
    ["she sells", " sea shells by the sea shore" * 10],  # 120 tokens: the context is cut to 8
]
DOCUMENTS = [LONG + " " + LONG, "hello world", "x", "red green blue yellow"]
PROMPTS = ["the quick brown fox", "a", "to be or not to be that is",
           "hello world this is a tiny test of a tiny model red green", "she sells sea"]


@pytest.fixture(scope="module", params=["bos", "no-bos"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A model folder, its HFLM, and a TaskContext on the same weights."""
    folder = build_bpe_model(tmp_path_factory.mktemp("bpe") / request.param,
                             add_bos=request.param == "bos", seed=11)
    harness = lm_eval_hf.HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ctx = TaskContext(model, "k" * 16, hooks=TaskHooks(load_tokenizer=TokenizerCache().loader("k", folder)))
    return SimpleNamespace(folder=folder, harness=harness, ctx=ctx, model=model)


def _instances(*args: Any) -> list[Any]:
    return [SimpleNamespace(args=tuple(a) if isinstance(a, (list, tuple)) else (a,)) for a in args]


def _greedy_pairs(case: SimpleNamespace) -> list[list[str]]:
    """Pairs whose continuation is the model's own next token: is_greedy can be True."""
    contexts = ["the lazy dog", "one two", "hello world this", "red green"]
    texts = call_task(case.ctx, "modelq.generate", [contexts], {"max_new_tokens": 1}, LIMIT).value
    return [[c, t] for c, t in zip(contexts, texts, strict=True) if t]


@pytest.mark.parametrize("batch_size", [None, 1])
def test_loglikelihood_equals_hflm(case: SimpleNamespace, batch_size: int | None) -> None:
    pairs = [*PAIRS, *_greedy_pairs(case)]
    expected = case.harness.loglikelihood(_instances(*pairs), disable_tqdm=True)
    got = call_task(case.ctx, "modelq.loglikelihood", [pairs], {"batch_size": batch_size}, LIMIT).value
    assert [r["logprob"] for r in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert [r["is_greedy"] for r in got] == [greedy for _, greedy in expected]
    assert any(r["is_greedy"] for r in got[len(PAIRS):])  # the comparison above is not all False
    assert all(r["tokens"] >= 1 for r in got)


def test_a_continuation_over_the_models_length_is_refused(case: SimpleNamespace) -> None:
    message = r"requests\[1\]: the continuation is \d+ tokens, over the model's length of 128"
    with pytest.raises(InvalidJob, match=message):
        call_task(case.ctx, "modelq.loglikelihood", [[["a", " b"], ["she", " sea shells" * 80]]], {}, LIMIT)


def test_a_lone_string_is_scored_after_an_empty_context(case: SimpleNamespace) -> None:
    expected = case.harness.loglikelihood(_instances(["", "the lazy dog"]), disable_tqdm=True)
    got = call_task(case.ctx, "modelq.loglikelihood", [["the lazy dog"]], {}, LIMIT).value
    assert got[0]["logprob"] == pytest.approx(expected[0][0], abs=1e-4)


def test_loglikelihood_rolling_equals_hflm(case: SimpleNamespace) -> None:
    expected = case.harness.loglikelihood_rolling(_instances(*DOCUMENTS), disable_tqdm=True)
    got = call_task(case.ctx, "modelq.loglikelihood_rolling", [DOCUMENTS], {"batch_size": 3}, LIMIT).value
    assert [r["logprob"] for r in got] == pytest.approx(expected, abs=1e-3)
    encoded = [len(case.harness.tok_encode(d)) for d in DOCUMENTS]
    assert [r["tokens"] for r in got] == encoded  # every token scored once
    assert encoded[0] > 2 * 128  # several windows


def test_generate_until_equals_hflm(case: SimpleNamespace) -> None:
    options = {"until": [" the", "\n"], "max_gen_toks": 12, "do_sample": False}
    expected = case.harness.generate_until(_instances(*[(p, options) for p in PROMPTS]), disable_tqdm=True)
    got = call_task(case.ctx, "modelq.generate", [PROMPTS],
                    {"until": options["until"], "max_gen_toks": 12}, LIMIT).value
    assert got == expected
    assert any(text for text in got)


def test_batched_greedy_generation_equals_one_at_a_time(case: SimpleNamespace) -> None:
    one = call_task(case.ctx, "modelq.generate", [PROMPTS], {"max_new_tokens": 16, "batch_size": 1},
                    LIMIT).value
    many = call_task(case.ctx, "modelq.generate", [PROMPTS], {"max_new_tokens": 16}, LIMIT).value
    assert many == one and len(set(one)) == len(one)


def test_a_seeded_sample_is_the_same_whatever_batch_it_lands_in(case: SimpleNamespace) -> None:
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 5}
    alone = [call_task(case.ctx, "modelq.generate", [[p]], options, LIMIT).value[0] for p in PROMPTS[:3]]
    together = call_task(case.ctx, "modelq.generate", [PROMPTS[2::-1]], options, LIMIT).value
    assert together[::-1] == alone
    repeated = call_task(case.ctx, "modelq.generate", [[PROMPTS[0]] * 3], options, LIMIT).value
    assert repeated[0] == alone[0] and len(set(repeated)) > 1  # equal prompts: their own streams
    other = call_task(case.ctx, "modelq.generate", [PROMPTS[:3]], {**options, "seed": 6}, LIMIT).value
    assert other != alone
    # a call shared by jobs (cross-job batching): equal prompts are counted within each job
    three_jobs = replace(case.ctx, row_jobs=(0, 1, 2))
    same = [PROMPTS[0]] * 3
    assert call_task(three_jobs, "modelq.generate", [same], options, LIMIT).value == [alone[0]] * 3
    two_jobs = replace(case.ctx, row_jobs=(0, 0, 1))
    assert call_task(two_jobs, "modelq.generate", [same], options, LIMIT).value == [
        repeated[0], repeated[1], repeated[0]]


def test_scores_never_build_a_float32_matrix_of_every_position(case: SimpleNamespace,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    original = torch.Tensor.log_softmax

    def spy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(tuple(self.shape))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "log_softmax", spy)
    got = call_task(case.ctx, "modelq.loglikelihood", [[[LONG, " the end"]]], {}, LIMIT).value
    assert shapes == [(got[0]["tokens"], 320)]  # the continuation's positions alone, not all 128
