"""The built-in tasks on tiny models, in process: generate equals the model's own results, batched or
not, with mixed adapters and out-of-memory batches split; loglikelihood batched equals one at a time
(against lm-eval's HFLM: tests/test_scoring.py); add_adapter and train_adapter lower the loss and
leave everything else byte-for-byte as it was (an nf4 base too); save_adapter writes a folder
peft loads back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from schemas import Cancelled, InvalidJob, TaskFailed
from tests.support.models import TOKENIZER_LINES, build_lora, build_model
from worker.modeltasks.builtin.lora import ADAPTER_FILES
from worker.modeltasks.io import TokenizerCache, paths_under
from worker.modeltasks.registry import TaskContext, TaskHooks, call_task

LIMIT = 1 << 20
PROMPTS = ["the quick brown fox", "to be or not"]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builtin")
    base = build_model("llama", root / "base")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in TOKENIZER_LINES))
    return {"root": root, "base": base, "a": build_lora(base, root / "lora-a", seed=1),
            "b": build_lora(base, root / "lora-b", seed=2), "data": data}


@pytest.fixture(scope="module")
def tokenizer(folders: dict[str, Path]) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folders["base"])
    return loaded


def _base(folders: dict[str, Path], **kwargs: Any) -> torch.nn.Module:
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folders["base"], **kwargs)
    return model.eval()


def _two_adapters(folders: dict[str, Path]) -> PeftModel:
    model = PeftModel.from_pretrained(_base(folders), str(folders["a"]), adapter_name="a")
    model.load_adapter(str(folders["b"]), adapter_name="b")
    model.set_adapter("a", inference_mode=True)
    return model.eval()


def _ctx(model: torch.nn.Module, folders: dict[str, Path], **fields: Any) -> TaskContext:
    hooks = TaskHooks(load_tokenizer=TokenizerCache().loader("m", folders["base"]),
                      resolve_path=paths_under(folders["root"]), **fields.pop("hooks", {}))
    return TaskContext(model, "m" * 16, hooks=hooks, **fields)


def _reference(model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str, **options: Any) -> str:
    encoded = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**encoded, do_sample=False, **options)
    return str(tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))


def _snapshot(model: torch.nn.Module, skip: str | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, as bytes (4-bit weights included), but adapter `skip`'s."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in state.items() if skip is None or f".{skip}." not in k}


def _raw(model: torch.nn.Module, skip: str) -> dict[str, torch.Tensor]:
    """Parameters, buffers and 4-bit quant states as they are held (state_dict() would unpack
    bitsandbytes' CPU-packed weights in place), but adapter `skip`'s."""
    held = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            held[f"{name}.absmax"] = state.absmax.clone()
    return {k: v for k, v in held.items() if f".{skip}." not in k}


def _same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)


# --- generate ---------------------------------------------------------------------------

def test_greedy_generate_equals_model_generate(folders: dict[str, Path],
                                               tokenizer: PreTrainedTokenizerBase) -> None:
    model = _base(folders)
    out = call_task(_ctx(model, folders), "modelq.generate", [PROMPTS], {"max_new_tokens": 12}, LIMIT)
    assert out.value == [_reference(model, tokenizer, p, max_new_tokens=12) for p in PROMPTS]
    assert all(len(text.split()) >= 1 for text in out.value)
    single = call_task(_ctx(model, folders), "modelq.generate", [PROMPTS[0]], {"max_new_tokens": 12}, LIMIT)
    assert single.value == out.value[:1]


def test_with_two_adapters_each_generates_as_its_own_reference(folders: dict[str, Path],
                                                              tokenizer: PreTrainedTokenizerBase) -> None:
    model = _two_adapters(folders)
    results = {}
    for name in ("a", "b"):
        out = call_task(_ctx(model, folders, adapters=(name,)), "modelq.generate", [PROMPTS],
                        {"max_new_tokens": 10}, LIMIT)
        reference = PeftModel.from_pretrained(_base(folders), str(folders[name])).eval()
        assert out.value == [_reference(reference, tokenizer, p, max_new_tokens=10) for p in PROMPTS]
        results[name] = out.value
    base = call_task(_ctx(model, folders, adapters=()), "modelq.generate", [PROMPTS],
                     {"max_new_tokens": 10}, LIMIT)
    assert base.value == [_reference(_base(folders), tokenizer, p, max_new_tokens=10) for p in PROMPTS]
    assert len({json.dumps(v) for v in (results["a"], results["b"], base.value)}) == 3
    assert model.active_adapters == ["a"]


def test_generate_cuts_at_the_first_stop_string(folders: dict[str, Path]) -> None:
    model = _base(folders)
    full = call_task(_ctx(model, folders), "modelq.generate", [PROMPTS[0]], {"max_new_tokens": 12}, LIMIT)
    words = full.value[0].split()
    stop = f" {words[2]}"
    cut = call_task(_ctx(model, folders), "modelq.generate", [PROMPTS[0]],
                    {"max_new_tokens": 12, "stop": [stop, "zzz never"]}, LIMIT)
    assert cut.value == [full.value[0][:full.value[0].index(stop)]]


def test_sampling_with_a_seed_repeats_and_leaves_the_global_rng_alone(folders: dict[str, Path]) -> None:
    model = _base(folders)
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 7}
    state = torch.random.get_rng_state()
    first = call_task(_ctx(model, folders), "modelq.generate", [PROMPTS], options, LIMIT).value
    assert torch.equal(torch.random.get_rng_state(), state)
    assert call_task(_ctx(model, folders), "modelq.generate", [PROMPTS], options, LIMIT).value == first


def test_generate_checks_for_cancel_between_tokens(folders: dict[str, Path]) -> None:
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 4:
            raise Cancelled("cancelled by the producer")
    ctx = _ctx(_base(folders), folders, hooks={"check_cancel": check})
    with pytest.raises(Cancelled):
        call_task(ctx, "modelq.generate", [PROMPTS[0]], {"max_new_tokens": 30}, LIMIT)
    assert len(calls) == 4  # once before the prompt, then after each new token


@pytest.mark.parametrize("kwargs, message", [({"prompts": 3}, "prompts must be"),
                                             ({"prompts": "x", "max_new_tokens": 0}, "max_new_tokens"),
                                             ({"prompts": "x", "stop": [""]}, "stop must be")])
def test_bad_generate_arguments_are_invalid(folders: dict[str, Path], kwargs: dict[str, Any],
                                            message: str) -> None:
    with pytest.raises(InvalidJob, match=message):
        call_task(_ctx(_base(folders), folders), "modelq.generate", [], kwargs, LIMIT)


# --- loglikelihood ------------------------------------------------------------------------

def test_loglikelihood_batched_equals_one_at_a_time(folders: dict[str, Path]) -> None:
    """(Scores against lm-eval's HFLM itself: tests/test_scoring.py.)"""
    requests: list[Any] = ["the cat sat on the mat", ["to be or", " not to be"], ["hello ", "world"],
                           ["", "one two three"], ["a", " b"]]
    ctx = _ctx(_two_adapters(folders), folders, adapters=("b",))
    batched = call_task(ctx, "modelq.loglikelihood", [requests], {}, LIMIT).value
    alone = call_task(ctx, "modelq.loglikelihood", [requests], {"batch_size": 1}, LIMIT).value
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in alone] == [6, 3, 1, 3, 1]
    assert [r["logprob"] for r in batched] == pytest.approx([r["logprob"] for r in alone], abs=1e-5)
    assert [r["is_greedy"] for r in batched] == [r["is_greedy"] for r in alone]


def test_rows_with_their_own_adapters_score_and_generate_as_each_alone(folders: dict[str, Path]) -> None:
    model = _two_adapters(folders)
    rows = ("a", "__base__", "b", "a", "b", "__base__")
    prompts = ["the quick brown fox", "to be or not", "she sells", "a cat sat on", "one two", "red green"]
    mixed = _ctx(model, folders, row_adapters=rows)
    generated = call_task(mixed, "modelq.generate", [prompts], {"max_new_tokens": 6}, LIMIT).value
    scored = call_task(mixed, "modelq.loglikelihood", [prompts], {}, LIMIT).value
    for name in ("a", "b", "__base__"):
        picked = [i for i, row in enumerate(rows) if row == name]
        own = _ctx(model, folders, adapters=() if name == "__base__" else (name,))
        alone = call_task(own, "modelq.generate", [[prompts[i] for i in picked]],
                          {"max_new_tokens": 6, "batch_size": 1}, LIMIT).value
        assert [generated[i] for i in picked] == alone, name
        scores = call_task(own, "modelq.loglikelihood", [[prompts[i] for i in picked]], {}, LIMIT).value
        expected = [r["logprob"] for r in scores]
        assert [scored[i]["logprob"] for i in picked] == pytest.approx(expected, abs=1e-5)
    assert len(set(generated[0::3])) > 1 and model.active_adapters == ["a"]
    with pytest.raises(InvalidJob, match="no adapter named 'zz'"):
        call_task(_ctx(model, folders, row_adapters=("a", "zz")), "modelq.generate", [prompts[:2]], {}, LIMIT)


class _SmallMemory(torch.nn.Module):
    """A model that runs out of memory on any batch of more than `rows` rows, as a GPU would."""

    def __init__(self, model: torch.nn.Module, rows: int, error: type[Exception]) -> None:
        super().__init__()
        self.inner, self.rows, self.error = model, rows, error
        self.sizes: list[int] = []
        self.config, self.forward = model.config, self._forward

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        self.sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > self.rows:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(input_ids=input_ids, **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        self.sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > self.rows:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.generate(input_ids=input_ids, **kwargs)  # type: ignore[operator]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_a_batch_that_runs_out_of_memory_is_split_and_the_job_finishes(folders: dict[str, Path],
                                                                      error: type[Exception]) -> None:
    prompts = ["the quick brown fox", "to be or not", "she sells", "a cat sat on", "one two", "red"]
    expected = call_task(_ctx(_base(folders), folders), "modelq.generate", [prompts],
                         {"max_new_tokens": 5, "batch_size": 1}, LIMIT).value
    small = _SmallMemory(_base(folders), rows=2, error=error)
    got = call_task(_ctx(small, folders), "modelq.generate", [prompts], {"max_new_tokens": 5}, LIMIT).value
    assert got == expected
    assert small.sizes[0] == 6 and max(small.sizes[1:]) <= 3 and small.sizes.count(6) == 1
    scores = call_task(_ctx(small, folders), "modelq.loglikelihood", [prompts], {}, LIMIT).value
    assert len(scores) == 6 and all(r["tokens"] >= 1 for r in scores)


def test_other_errors_are_not_taken_for_out_of_memory(folders: dict[str, Path]) -> None:
    small = _SmallMemory(_base(folders), rows=0, error=ValueError)
    with pytest.raises(TaskFailed, match="ValueError: CUDA out of memory"):
        call_task(_ctx(small, folders), "modelq.generate", [["a", "b"]], {}, LIMIT)
    assert small.sizes == [2]  # not retried


def test_batches_are_length_sorted_and_capped_by_padded_tokens() -> None:
    from worker.modeltasks.builtin.padded_batches import BatchRunner

    runner = BatchRunner([5, 50, 10, 40, 45, 1], batch_size=3, max_tokens=100)
    assert list(runner.batches()) == [[1, 4], [3, 2], [0, 5]]  # 50*2 <= 100 < 50*3; 40*3 > 100
    seen: list[list[int]] = []

    def run(rows: list[int]) -> list[int]:
        seen.append(rows)
        return [i * 10 for i in rows]
    assert runner.run(run) == [0, 10, 20, 30, 40, 50]
    assert seen == [[1, 4], [3, 2], [0, 5]]
    assert list(BatchRunner([1] * 7, batch_size=3, max_tokens=100).batches()) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(BatchRunner([500, 2], batch_size=8, max_tokens=100).batches()) == [[0], [1]]


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, "batch_size must be"),
                                             ({"max_batch_tokens": -1}, "max_batch_tokens must be"),
                                             ({"max_gen_toks": 500}, r"max_gen_toks \(500\) must be less")])
def test_bad_batching_arguments_are_invalid(folders: dict[str, Path], kwargs: dict[str, Any],
                                            message: str) -> None:
    with pytest.raises(InvalidJob, match=message):
        call_task(_ctx(_base(folders), folders), "modelq.generate", [["a"]], kwargs, LIMIT)


def test_loglikelihood_refuses_malformed_requests(folders: dict[str, Path]) -> None:
    with pytest.raises(InvalidJob, match=r"requests\[1\] must be a string or a \[context, continuation\]"):
        call_task(_ctx(_base(folders), folders), "modelq.loglikelihood", [["ok", ["a", "b", "c"]]], {}, LIMIT)


# --- adapters: add, train, save -------------------------------------------------------------

def _train(ctx: TaskContext, folders: dict[str, Path], adapter: str, steps: int, **kwargs: Any) -> Any:
    return call_task(ctx, "modelq.train_adapter", [adapter, str(folders["data"]), steps],
                     {"learning_rate": 2e-2, "batch_size": 4, **kwargs}, LIMIT).value


def test_add_adapter_wraps_a_plain_model_and_hands_it_back(folders: dict[str, Path]) -> None:
    plain = _base(folders)
    ctx = _ctx(plain, folders)
    out = call_task(ctx, "modelq.add_adapter", ["new", LORA], {}, LIMIT)
    assert out.replaced and isinstance(out.model, PeftModel) and ctx.model is out.model
    # r=4 on q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers: 2 * (4*64 + 64*4 + 4*64 + 32*4)
    assert out.value == {"adapter": "new", "trainable_parameters": 1792}
    assert not any(p.requires_grad for p in out.model.parameters()) and not out.model.training


def test_add_adapter_on_a_peft_model_keeps_the_active_adapters(folders: dict[str, Path]) -> None:
    model = _two_adapters(folders)
    out = call_task(_ctx(model, folders), "modelq.add_adapter", ["c", LORA], {}, LIMIT)
    assert not out.replaced and set(model.peft_config) == {"a", "b", "c"} and model.active_adapters == ["a"]
    call_task(_ctx(model, folders), "modelq.add_adapter", ["d", LORA], {"activate": True}, LIMIT)
    assert model.active_adapters == ["d"]  # asked for: a task that changes adapters keeps its change


@pytest.mark.parametrize("name, config, message", [
    ("a", LORA, "has an adapter named 'a' already"),
    ("x", {"r": 4, "rank": 4}, "fields LoraConfig does not know: rank"),
    ("x", {"r": 4, "task_type": "SEQ_CLS"}, "task_type must be CAUSAL_LM"),
    ("x", {"target_modules": ["no_such_proj"]}, "does not fit|cannot be added"),
    ("bad name", LORA, "adapter name 'bad name'"),
])
def test_add_adapter_refuses_bad_names_and_configs(folders: dict[str, Path], name: str,
                                                    config: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidJob, match=message):
        call_task(_ctx(_two_adapters(folders), folders), "modelq.add_adapter", [name, config], {}, LIMIT)


def test_train_lowers_the_loss_and_changes_nothing_else(folders: dict[str, Path]) -> None:
    model = _two_adapters(folders)
    reported: list[Any] = []
    ctx = _ctx(model, folders, hooks={"progress": lambda d, t, m: reported.append((d, t, m))})
    call_task(ctx, "modelq.add_adapter", ["new", LORA], {}, LIMIT)
    before = _snapshot(model, skip="new")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    out = _train(ctx, folders, "new", 8)
    losses = out["losses"]
    assert out["adapter"] == "new" and out["output_dir"] is None and len(losses) == 8
    assert losses[-1] < losses[0] - 0.05
    assert [(d, t, m["loss"]) for d, t, m in reported] == [(i + 1, 8, loss) for i, loss in enumerate(losses)]
    assert all({"learning_rate", "grad_norm", "tokens_per_second"} <= set(m) for _, _, m in reported)
    assert _same(before, _snapshot(model, skip="new"))  # the base and adapters a, b: byte for byte
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not any(m.training for m in model.modules()) and model.active_adapters == ["a"]
    assert all(p.grad is None for p in model.parameters())


def test_a_trained_adapter_saves_where_asked_and_peft_loads_it(folders: dict[str, Path],
                                                               tokenizer: PreTrainedTokenizerBase) -> None:
    model = _two_adapters(folders)
    ctx = _ctx(model, folders)
    call_task(ctx, "modelq.add_adapter", ["tuned", LORA], {}, LIMIT)
    out_dir = folders["root"] / "trained"
    _train(ctx, folders, "tuned", 3, output_dir=str(out_dir))
    saved = folders["root"] / "saved"
    value = call_task(ctx, "modelq.save_adapter", ["tuned", str(saved)], {}, LIMIT).value
    assert value == {"adapter": "tuned", "output_dir": str(saved)}
    expected = call_task(_ctx(model, folders, adapters=("tuned",)), "modelq.generate", [PROMPTS],
                         {"max_new_tokens": 10}, LIMIT).value
    for folder in (out_dir, saved):
        assert sorted(p.name for p in folder.iterdir()) == sorted(ADAPTER_FILES)
        loaded = PeftModel.from_pretrained(_base(folders), str(folder)).eval()
        assert [_reference(loaded, tokenizer, p, max_new_tokens=10) for p in PROMPTS] == expected


def test_training_refuses_what_it_cannot_use(folders: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(_two_adapters(folders), folders)
    with pytest.raises(InvalidJob, match="no adapter named 'zz'"):
        _train(ctx, folders, "zz", 1)
    bad = folders["root"] / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong"}\n')
    with pytest.raises(InvalidJob, match=r"bad\.jsonl line 2 must be an object with a string \"text\""):
        call_task(ctx, "modelq.train_adapter", ["a", str(bad), 1], {}, LIMIT)
    with pytest.raises(InvalidJob, match="steps must be a positive integer"):
        _train(ctx, folders, "a", 0)
    from schemas import AccessDenied

    with pytest.raises(AccessDenied):
        call_task(ctx, "modelq.train_adapter", ["a", str(tmp_path / "elsewhere.jsonl"), 1], {}, LIMIT)


def test_train_on_an_nf4_base_that_served_generate_learns_and_leaves_the_base_alone(
        folders: dict[str, Path]) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on the first inference (no autograd
    through it): training after a generate must still lower the loss and change the adapter,
    and leave every byte of the base (the repacked weights too) as the generate left it, through
    the adapter's save too (a state_dict() unpacks repacked weights in place)."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # type: ignore[no-untyped-call]
                                      bnb_4bit_compute_dtype=torch.float32)
    model = _base(folders, quantization_config=quantization, device_map={"": "cpu"})
    ctx = _ctx(model, folders)
    call_task(ctx, "modelq.generate", [PROMPTS], {"max_new_tokens": 4}, LIMIT)
    call_task(ctx, "modelq.add_adapter", ["q", LORA], {}, LIMIT)
    before = _raw(ctx.model, skip="q")
    adapter = {k: v for k, v in _raw(ctx.model, "-").items() if ".q." in k}
    generated = call_task(_ctx(ctx.model, folders, adapters=()), "modelq.generate", [PROMPTS],
                          {"max_new_tokens": 6}, LIMIT).value
    out = _train(ctx, folders, "q", 10, output_dir=str(folders["root"] / "nf4-trained"))
    assert out["losses"][-1] < out["losses"][0] - 0.05, out["losses"]
    call_task(ctx, "modelq.save_adapter", ["q", str(folders["root"] / "nf4-saved")], {}, LIMIT)
    assert (folders["root"] / "nf4-saved" / "adapter_model.safetensors").is_file()
    trained = {k: v for k, v in _raw(ctx.model, "-").items() if ".q." in k}
    assert any(not torch.equal(adapter[k], trained[k]) for k in adapter if "lora_A" in k)
    assert _same(before, _raw(ctx.model, skip="q"))
    assert call_task(_ctx(ctx.model, folders, adapters=()), "modelq.generate", [PROMPTS],
                     {"max_new_tokens": 6}, LIMIT).value == generated
    assert any("4bit" in type(m).__name__ for m in ctx.model.modules())
