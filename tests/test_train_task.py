"""modelq.train_adapter in process on a tiny float32 model: resume equals an uninterrupted run,
the dataset formats mask as TRL's SFTTrainer does, bad data is refused before training, a
non-finite loss saves nothing, and the schedule, evaluation and checkpoint files behave."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas import Cancelled, InvalidJob, TaskFailed
from tests.support.models import TOKENIZER_LINES, build_model
from worker.modeltasks.io import TokenizerCache, paths_under
from worker.modeltasks.registry import TaskContext, TaskHooks, call_task
from worker.training.checkpoints import Checkpoint, CheckpointStore

LIMIT = 1 << 20
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    base = build_model("llama", folder / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TOKENIZER_LINES))
    return folder


def _ctx(root: Path, job: str | None = "job-1", **hooks: Any) -> TaskContext:
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    return TaskContext(model, "m" * 16, job_id=job, hooks=TaskHooks(
        load_tokenizer=TokenizerCache().loader("m", root / "base"), resolve_path=paths_under(root),
        checkpoint_dir=root / "checkpoints", **hooks))


def _train(ctx: TaskContext, root: Path, **kwargs: Any) -> Any:
    options = {"adapter": "t", "dataset": str(root / "data.jsonl"), "steps": 6, "lora": LORA,
               "learning_rate": 1e-2, "batch_size": 2, "gradient_accumulation_steps": 2, **kwargs}
    return call_task(ctx, "modelq.train_adapter", [], options, LIMIT).value


def _weights(ctx: TaskContext) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ctx.model.named_parameters() if ".t." in n}


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(root: Path) -> None:
    whole = _ctx(root, "whole")
    expected = _train(whole, root, checkpoint_steps=2)
    assert expected["resumed_from_step"] == 0 and len(expected["losses"]) == 6
    assert not (root / "checkpoints" / "_" / "whole").exists()  # removed on success
    calls: list[int] = []

    def kill_in_step_five() -> None:  # 2 micro-batches a step, a check before each and after both
        calls.append(1)
        if len(calls) == 3 * 4 + 2:
            raise Cancelled("killed")
    with pytest.raises(Cancelled):
        _train(_ctx(root, "cut", check_cancel=kill_in_step_five), root, checkpoint_steps=2)
    kept = root / "checkpoints" / "_" / "cut"
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    again = _ctx(root, "cut")  # a fresh model, as another worker would load it
    resumed = _train(again, root, checkpoint_steps=2)
    assert resumed["resumed_from_step"] == 4
    assert resumed["losses"] == pytest.approx(expected["losses"], abs=1e-6)
    want, got = _weights(whole), _weights(again)
    assert want.keys() == got.keys() and want
    assert all(torch.allclose(want[k], got[k], atol=1e-5, rtol=0) for k in want)
    assert _train(_ctx(root, "seeded"), root, steps=2)["losses"] == pytest.approx(expected["losses"][:2])


def test_prompt_completion_trains_on_the_completion_only(root: Path) -> None:
    data = root / "pc.jsonl"
    data.write_text(json.dumps({"prompt": "the quick brown", "completion": " fox jumps over"}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    prompt = tokenizer("the quick brown")["input_ids"]
    ids = tokenizer("the quick brown fox jumps over")["input_ids"] + [tokenizer.eos_token_id]
    labels = [-100] * len(prompt) + ids[len(prompt):]
    expected = _loss(root, ids, labels)
    got = _train(_ctx(root, None), root, dataset=str(data), steps=1, batch_size=1,
                 gradient_accumulation_steps=1, lora={**LORA, "lora_dropout": 0.0})
    assert got["losses"][0] == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(_loss(root, ids, list(ids)), abs=1e-3)  # the mask matters


def test_messages_train_on_the_assistant_turns_only(root: Path) -> None:
    chat = [{"role": "user", "content": "the quick brown"}, {"role": "assistant", "content": "fox jumps"},
            {"role": "user", "content": "over the"}, {"role": "assistant", "content": "lazy dog"}]
    data = root / "chat.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    eos = tokenizer.eos_token
    pieces = [("<|user|>\nthe quick brown" + eos + "\n<|assistant|>\n", False),
              ("fox jumps" + eos + "\n", True),
              ("<|user|>\nover the" + eos + "\n<|assistant|>\n", False), ("lazy dog" + eos + "\n", True)]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [-100] * len(part)
    assert ids == tokenizer(tokenizer.apply_chat_template(chat, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    got = _train(_ctx(root, None), root, dataset=str(data), steps=1, batch_size=1,
                 gradient_accumulation_steps=1, lora={**LORA, "lora_dropout": 0.0})
    assert got["losses"][0] == pytest.approx(_loss(root, ids, labels), abs=1e-5)


def _loss(root: Path, ids: list[int], labels: list[int]) -> float:
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)


def test_data_without_a_trained_token_is_refused_before_training(root: Path) -> None:
    data = root / "empty.jsonl"
    data.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}) + "\n")
    calls: list[int] = []
    with pytest.raises(InvalidJob, match="no row leaves a single token to train on"):
        _train(_ctx(root, None, check_cancel=lambda: calls.append(1)), root, dataset=str(data))
    assert calls == []
    mixed = root / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(InvalidJob, match="line 2 is not in the text format"):
        _train(_ctx(root, None), root, dataset=str(mixed))


def test_a_non_finite_loss_stops_the_job_naming_the_step_and_saves_nothing(root: Path) -> None:
    out = root / "nan-out"
    ctx = _ctx(root, "nan")
    calls: list[int] = []

    def poison_after_step_two() -> None:  # 3 checks a step: the base turns bad during step 3
        calls.append(1)
        if len(calls) == 7:
            with torch.no_grad():
                ctx.model.lm_head.weight[5, 0] = float("nan")
    ctx.hooks.check_cancel = poison_after_step_two
    with pytest.raises(TaskFailed, match=r"loss is not finite at step 3; the adapter is not saved") as failed:
        _train(ctx, root, output_dir=str(out), checkpoint_steps=1)
    assert failed.value.details["step"] == 3
    assert not out.exists()
    assert CheckpointStore(root / "checkpoints" / "_" / "nan", 2).steps() == [1, 2]


def test_a_failed_run_on_an_existing_adapter_leaves_its_weights_as_they_were(root: Path) -> None:
    ctx = _ctx(root, None)
    _train(ctx, root, steps=2)  # makes adapter "t" (lora=...) and trains it: jobs may now use it
    before = _weights(ctx)
    calls: list[int] = []

    def poison_during_step_three() -> None:  # steps 1 and 2 change the adapter, then step 3 fails
        calls.append(1)
        if len(calls) == 7:
            with torch.no_grad():
                ctx.model.lm_head.weight[5, 0] = float("nan")
    ctx.hooks.check_cancel = poison_during_step_three
    with pytest.raises(TaskFailed, match="loss is not finite at step 3"):
        _train(ctx, root, lora=None, checkpoint_steps=0)  # no lora: train the adapter that is there
    after = _weights(ctx)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_schedule_eval_and_step_metrics(root: Path) -> None:
    reported: list[Any] = []
    ctx = _ctx(root, None, progress=lambda d, t, m: reported.append(m))
    out = _train(ctx, root, steps=4, lr_scheduler="linear", warmup_steps=2,
                 eval_dataset=str(root / "data.jsonl"),
                 eval_steps=2, weight_decay=0.1)
    assert [m["learning_rate"] for m in reported] == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    assert set(out["eval_losses"]) == {"2", "4"}
    assert "eval_loss" in reported[1] and "eval_loss" not in reported[0]
    assert all(m["tokens_per_second"] > 0 and m["grad_norm"] >= 0 for m in reported)
    with pytest.raises(InvalidJob, match="lr_scheduler must be one of constant, linear, cosine"):
        _train(_ctx(root, None), root, lr_scheduler="exp")


def test_a_checkpoint_is_picked_only_when_complete(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "job", keep=2)
    state = Checkpoint(1, {"w": torch.ones(2)}, {"state": {}, "param_groups": []}, {"last_epoch": 1},
                       {"torch": torch.random.get_rng_state()}, {"losses": [1.0]})
    for step in (1, 2, 3):
        store.save(Checkpoint(step, *list(vars(state).values())[1:]))
    assert store.steps() == [2, 3]
    shutil.copytree(tmp_path / "job" / "checkpoint-3", tmp_path / "job" / "checkpoint-9")
    (tmp_path / "job" / "checkpoint-9" / "trainer_state.json").unlink()  # killed before its last file
    (tmp_path / "job" / ".tmp-checkpoint-7-x").mkdir()  # killed before the rename
    latest = store.latest()
    assert latest is not None and latest.step == 3 and torch.equal(latest.weights["w"], torch.ones(2))
