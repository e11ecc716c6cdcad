"""Run jobs end to end: real Redis, real `modelq worker` processes, the public Client and CLI.

The worker's answers are compared with the same computation done here in process on
the same folders: greedy generate token for token, loglikelihood within 1e-4, and an
adapter trained on the worker, saved, and loaded here with peft.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas import JobStatus, LoadJob, RunResult, TaskNotFound
from tasks.client import Client
from tests.support.models import TOKENIZER_LINES
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e
PROMPT = "the quick brown fox"


def _load(models: dict[str, Path], *adapters: tuple[str, str]) -> LoadJob:
    return LoadJob.model_validate({"model": str(models["llama"]),
                                   "adapters": [{"ref": str(models[a]), "name": n} for a, n in adapters]})


def _reference_generate(models: dict[str, Path], adapter: str | None, tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    model: Any = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(models[adapter])).eval()
    encoded = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**encoded, max_new_tokens=tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))


def _value(record: Any) -> Any:
    assert record.status is JobStatus.succeeded, record.error
    assert isinstance(record.result, RunResult)
    return record.result.value


def test_generate_matches_in_process_generate_for_each_adapter(client: Client, pool: WorkerPool,
                                                               models: dict[str, Path]) -> None:
    pool.start("gen")
    loaded = client.submit(_load(models, ("lora", "a"), ("lora2", "b"))).wait(timeout=120)
    key = loaded.result.model_key  # type: ignore[union-attr]
    for adapters, reference in ((["a"], "lora"), (["b"], "lora2"), ([], None)):
        record = client.run("modelq.generate", model=key, adapters=adapters,
                            kwargs={"prompts": PROMPT, "max_new_tokens": 12}).wait(timeout=60)
        assert _value(record) == [_reference_generate(models, reference, 12)], adapters
        assert record.result.cache_hit and record.result.model.model_key == key  # type: ignore[union-attr]
    # the model's own activation is back after each call: the job's load left 'b' active
    assert client.status(loaded.job_id).result.active_adapters == ("b",)  # type: ignore[union-attr]


def test_a_run_with_a_load_spec_loads_first_then_scores(client: Client, pool: WorkerPool,
                                                        models: dict[str, Path]) -> None:
    pool.start("score")
    requests = ["the lazy dog", ["the quick brown", " fox jumps"]]
    handle = client.run("modelq.loglikelihood", model=LoadJob(model=str(models["llama"])),
                        args=[requests])
    record = handle.wait(timeout=120)
    got = _value(record)
    assert record.result.cache_hit is False  # type: ignore[union-attr]
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    model: Any = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    expected = []
    for request in requests:
        if isinstance(request, str):
            ids, scored = tokenizer(request)["input_ids"], None
        else:
            context = tokenizer(request[0])["input_ids"]
            ids = context + tokenizer(request[1], add_special_tokens=False)["input_ids"]
            scored = len(ids) - len(context)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
        picks = [logits[i - 1, ids[i]].item() for i in range(1, len(ids))]
        picks = picks if scored is None else picks[-scored:]
        expected.append((sum(picks), len(picks)))
    assert [r["tokens"] for r in got] == [tokens for _, tokens in expected]
    assert [r["logprob"] for r in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    stages = [e.stage for e in handle.events(timeout=5)]
    assert "resolving" in stages and "running_task" in stages


def test_train_an_adapter_save_it_and_load_it_elsewhere(client: Client, pool: WorkerPool,
                                                        models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    pool.start("train")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in TOKENIZER_LINES))
    key = client.submit(LoadJob(model=str(models["llama"]))).wait(timeout=120).result.model_key  # type: ignore[union-attr]
    added = client.run("modelq.add_adapter", model=key, kwargs={
        "name": "mine", "config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    ).wait(timeout=60)
    assert _value(added)["trainable_parameters"] > 0 and "mine" in added.result.model.adapters  # type: ignore[union-attr]
    out = tmp_path / "saved"
    handle = client.run("modelq.train_adapter", model=key, kwargs={
        "adapter": "mine", "dataset": str(data), "steps": 8, "batch_size": 4,
        "learning_rate": 5e-3, "output_dir": str(out)})
    trained = _value(handle.wait(timeout=120))
    assert len(trained["losses"]) == 8 and trained["losses"][-1] < trained["losses"][0]
    steps = [e for e in handle.events(timeout=5) if e.metrics]
    assert [e.progress.done for e in steps] == list(range(1, 9))  # type: ignore[union-attr]
    assert [e.metrics["loss"] for e in steps] == pytest.approx(trained["losses"])  # type: ignore[index]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    on_worker = _value(client.run("modelq.generate", model=key, adapters="mine",
                                  kwargs={"prompts": PROMPT, "max_new_tokens": 10}).wait(timeout=60))
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    here: Any = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]),
                                          str(out)).eval()
    encoded = tokenizer(PROMPT, return_tensors="pt")
    ids = here.generate(**encoded, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert on_worker == [tokenizer.decode(ids[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)]
    attached = client.submit({"kind": "attach", "model_key": key, "adapter": {"path": str(out)},
                              "name": "again"}).wait(timeout=60)
    assert attached.status is JobStatus.succeeded and "again" in attached.result.adapters  # type: ignore[union-attr]


def test_user_tasks_and_task_failures(client: Client, pool: WorkerPool, models: dict[str, Path],
                                      tmp_path: Path) -> None:
    module = tmp_path / "acme_tasks.py"
    module.write_text(textwrap.dedent('''
        from worker import TaskContext, model_task

        @model_task("acme.count")
        def count(ctx: TaskContext, text: str) -> dict:
            return {"tokens": len(ctx.tokenizer(text)["input_ids"]), "key": ctx.model_key}

        @model_task("acme.broken")
        def broken(ctx: TaskContext) -> None:
            raise KeyError("no such thing")

        @model_task("acme.huge")
        def huge(ctx: TaskContext) -> str:
            return "x" * (2 << 20)
    '''))
    pool.start("user", "--tasks", "acme_tasks", env={"PYTHONPATH": str(tmp_path)})
    key = client.submit(LoadJob(model=str(models["llama"]))).wait(timeout=120).result.model_key  # type: ignore[union-attr]
    assert "acme.count" in {t for w in client.workers() for t in w.tasks}
    counted = _value(client.run("acme.count", model=key, args=["the lazy dog"]).wait(timeout=60))
    assert counted == {"tokens": 4, "key": key}
    broken = client.run("acme.broken", model=key).wait(timeout=60)
    assert broken.status is JobStatus.failed and broken.error is not None
    assert (broken.error.type, broken.error.retryable) == ("TaskFailed", False)
    assert "KeyError" in broken.error.message and "Traceback" not in broken.error.message
    huge = client.run("acme.huge", model=key).wait(timeout=60)
    assert huge.error is not None and huge.error.type == "ResultTooLarge"
    again = client.run("acme.count", model=key, args=["the dog"]).wait(timeout=60)  # still serving
    assert _value(again)["tokens"] == 3
    with pytest.raises(TaskNotFound, match="acme.nothing"):
        client.run("acme.nothing", model=key)


def test_cancel_a_long_generate(client: Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    pool.start("long")
    key = client.submit(LoadJob(model=str(models["llama"]))).wait(timeout=120).result.model_key  # type: ignore[union-attr]
    handle = client.run("modelq.generate", model=key,
                        kwargs={"prompts": [PROMPT] * 400, "max_new_tokens": 64})
    for event in handle.events(timeout=60):
        if event.stage == "running_task":
            break
    handle.cancel()
    record = handle.wait(timeout=30)
    assert record.status is JobStatus.cancelled
    after = client.run("modelq.generate", model=key, kwargs={"prompts": PROMPT, "max_new_tokens": 2})
    assert after.wait(timeout=60).status is JobStatus.succeeded


def test_cli_run_and_generate(pool: WorkerPool, models: dict[str, Path], redis_url: str) -> None:
    pool.start("cli")
    env = {"MODELQ_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

    def modelq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tasks.cli", *args], capture_output=True,
                              text=True, timeout=180, env={**__import__("os").environ, **env})

    done = modelq("generate", str(models["lora"]), PROMPT, "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == _reference_generate(models, "lora", 6).strip()
    listed = modelq("tasks", "--json")
    assert listed.returncode == 0 and "modelq.generate" in json.loads(listed.stdout)
    missing = modelq("run", "acme.absent", str(models["llama"]), "--wait")
    assert missing.returncode == 2 and "acme.absent" in missing.stderr
    ran = modelq("run", "modelq.loglikelihood", str(models["llama"]), "--arg", '["the lazy dog"]',
                 "--wait", "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["result"]["value"][0]["tokens"] == 3


def test_a_tenant_runs_only_on_its_own_models_and_reads_only_under_its_roots(
        pool: WorkerPool, settings: Any, models: dict[str, Path], tmp_path: Path) -> None:
    from schemas import AccessDenied
    from tests.support.tenancy import copy_into, tenant_client, write_tenants

    keys = {t: f"KEY-{t}-0123456789abcdef" for t in ("alice", "bob")}
    tenants = write_tenants(tmp_path / "tenants.toml", {
        t: {"key": keys[t], "roots": [str(tmp_path / t)]} for t in keys})
    pool.start("tenants", env={"MODELQ_TENANTS_FILE": str(tenants)})
    alice, bob = (tenant_client(settings, t, keys[t]) for t in ("alice", "bob"))
    mine = copy_into(models["llama"], tmp_path / "alice" / "llama")
    key = alice.submit(LoadJob(model=str(mine))).wait(timeout=120).result.model_key  # type: ignore[union-attr]
    assert _value(alice.run("modelq.generate", model=key,
                            kwargs={"prompts": PROMPT, "max_new_tokens": 3}).wait(timeout=60))
    with pytest.raises(AccessDenied):  # refused at submit: another tenant's model
        bob.run("modelq.generate", model=key, kwargs={"prompts": PROMPT})
    outside = tmp_path / "bob" / "data.jsonl"
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_text(json.dumps({"text": "the lazy dog"}) + "\n")
    alice.run("modelq.add_adapter", model=key, kwargs={
        "name": "x", "config": {"r": 2, "target_modules": ["q_proj"]}}).wait(timeout=60)
    record = alice.run("modelq.train_adapter", model=key, kwargs={
        "adapter": "x", "dataset": str(outside), "steps": 1}).wait(timeout=60)
    assert record.status is JobStatus.failed and record.error is not None
    assert record.error.type == "AccessDenied" and "alice" in record.error.message
