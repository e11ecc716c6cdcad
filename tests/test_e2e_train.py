"""Training jobs end to end: real Redis, real `modelq worker` processes, default settings.

A worker killed (SIGKILL) mid-training on a pool of two: the job resumes on the other worker
from its last checkpoint and ends with the adapter an uninterrupted run makes. On a float32
and on a 4-bit base that served generate and loglikelihood first, a training job leaves the
base alone and every other adapter answering as before; on the 4-bit base the loss falls as
in process and the saved adapter generates here what it generates on the worker. `modelq train`
follows a job live and writes TensorBoard's event files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from schemas import JobStatus, LoadJob, RunResult
from tasks.client import Client
from tests.support.models import TOKENIZER_LINES
from tests.support.workers import WorkerPool
from worker.modeltasks.io import TokenizerCache, paths_under
from worker.modeltasks.registry import TaskContext, TaskHooks, call_task

pytestmark = pytest.mark.e2e
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
PROMPTS = ["the quick brown fox", "to be or not"]
REQUESTS: list[Any] = ["the lazy dog", ["the quick brown", " fox jumps"]]


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in TOKENIZER_LINES * 4))
    return data


def _value(record: Any) -> Any:
    assert record.status is JobStatus.succeeded, record.error
    assert isinstance(record.result, RunResult)
    return record.result.value


def _in_process(models: dict[str, Path], kwargs: dict[str, Any], quantized: bool = False) -> tuple[Any, Any]:
    options: dict[str, Any] = {}
    if quantized:
        options = {"device_map": {"": "cpu"}, "quantization_config": BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)}
    model = AutoModelForCausalLM.from_pretrained(models["llama"], **options).eval()
    ctx = TaskContext(model, "m" * 16, hooks=TaskHooks(
        load_tokenizer=TokenizerCache().loader("m", models["llama"]), resolve_path=paths_under(Path("/"))))
    return call_task(ctx, "modelq.train_adapter", [], kwargs, 1 << 20).value, ctx.model


def test_a_worker_killed_mid_training_the_job_resumes_on_the_other(client: Client, pool: WorkerPool,
                                                                   models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    # The pool's usual shortened heartbeat and TTL (tests/support/workers.py): this test is about
    # resuming; redelivery after a kill -9 on default timings is test_reliability_defaults.py's.
    checkpoints = tmp_path / "checkpoints"  # one folder both workers see, as a shared mount would be
    env = {"MODELQ_CHECKPOINT_DIR": str(checkpoints)}
    workers = {w.name: w for w in (pool.start("t1", env=env), pool.start("t2", env=env))}
    kwargs = {"adapter": "tuned", "dataset": str(_data(tmp_path)), "steps": 40, "lora": LORA,
              "batch_size": 4, "gradient_accumulation_steps": 4, "learning_rate": 5e-3,
              "checkpoint_steps": 5, "lr_scheduler": "cosine", "warmup_steps": 3}
    handle = client.run("modelq.train_adapter", model=LoadJob(model=str(models["llama"])),
                        kwargs={**kwargs, "output_dir": str(tmp_path / "out")})
    for event in handle.events(timeout=180):
        if event.progress is not None and event.metrics and (event.progress.done or 0) >= 11:
            break
    first = client.status(handle.job_id)
    assert first.status is JobStatus.running and first.worker in workers
    workers[first.worker].kill()
    folder = checkpoints / "default" / handle.job_id  # tenant, then job
    saved = sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("checkpoint-"))
    assert len(saved) == 2 and saved[-1] >= 10  # the newest two kept
    record = handle.wait(timeout=240)
    trained = _value(record)
    assert record.attempt == 2 and record.worker != first.worker
    assert trained["resumed_from_step"] == saved[-1]
    expected, _ = _in_process(models, {**kwargs, "output_dir": str(tmp_path / "reference")})
    assert len(trained["losses"]) == 40
    assert trained["losses"] == pytest.approx(expected["losses"], abs=1e-5)
    got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("out", "reference"))
    assert got.keys() == want.keys() and got
    assert all(torch.allclose(got[k], want[k], atol=1e-5, rtol=0) for k in want)
    assert not folder.exists()  # removed once the job succeeded


def _answers(client: Client, key: str, adapters: list[str]) -> tuple[Any, Any]:
    generated = _value(client.run("modelq.generate", model=key, adapters=adapters,
                                  kwargs={"prompts": PROMPTS, "max_new_tokens": 8}).wait(timeout=60))
    scored = _value(client.run("modelq.loglikelihood", model=key, adapters=adapters,
                               args=[REQUESTS]).wait(timeout=60))
    return generated, scored


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_training_leaves_the_base_and_other_adapters_as_they_were(client: Client, pool: WorkerPool,
                                                                  models: dict[str, Path], tmp_path: Path,
                                                                  quantization: str) -> None:
    pool.start("keep")
    loaded = client.submit(LoadJob.model_validate({
        "model": str(models["llama"]), "dtype": "float32",
        "quantization": ({"method": quantization, "compute_dtype": "float32"}
                         if quantization != "none" else "none"),
        "adapters": [{"ref": str(models["lora"]), "name": "other"}]})).wait(timeout=120)
    assert loaded.status is JobStatus.succeeded, loaded.error
    key = loaded.result.model_key  # type: ignore[union-attr]
    views = (("base", []), ("other", ["other"]))
    before = {name: _answers(client, key, adapters) for name, adapters in views}
    kwargs = {"adapter": "fresh", "dataset": str(_data(tmp_path)), "steps": 12, "lora": LORA,
              "batch_size": 4, "learning_rate": 1e-2, "output_dir": str(tmp_path / "fresh")}
    record = client.run("modelq.train_adapter", model=key, kwargs=kwargs).wait(timeout=180)
    trained = _value(record)
    after = {name: _answers(client, key, adapters) for name, adapters in views}
    assert after == before  # nf4 too: saving the adapter once unpacked the base in place
    if quantization == "none":
        # r=4 on q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers: 1792 float32 parameters
        assert record.result.model.footprint_bytes == loaded.result.footprint_bytes + 1792 * 4  # type: ignore[union-attr]
    losses = trained["losses"]
    assert losses[-1] < losses[0] - 0.1, losses
    if quantization != "nf4":
        return
    here, _ = _in_process(models, kwargs | {"output_dir": str(tmp_path / "here")}, quantized=True)
    assert losses == pytest.approx(here["losses"], rel=2e-2)  # the base as inference repacked it: bf16 scales
    on_worker = _value(client.run("modelq.generate", model=key, adapters=["fresh"],
                                  kwargs={"prompts": PROMPTS, "max_new_tokens": 8}).wait(timeout=60))
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    base = AutoModelForCausalLM.from_pretrained(models["llama"], device_map={"": "cpu"},
                                                quantization_config=BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                                                    load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_compute_dtype=torch.float32))
    peft_model: Any = PeftModel.from_pretrained(base.eval(), str(tmp_path / "fresh")).eval()
    expected = []
    for prompt in PROMPTS:
        encoded = tokenizer(prompt, return_tensors="pt")
        ids = peft_model.generate(**encoded, max_new_tokens=8, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(ids[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    assert on_worker == expected


def test_modelq_train_follows_the_job_live_and_writes_tensorboard_events(
        pool: WorkerPool, models: dict[str, Path], redis_url: str, tmp_path: Path) -> None:
    pool.start("cli-train")
    out = tmp_path / "cli-adapter"
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "train", str(models["llama"]), str(_data(tmp_path)),
         "--steps", "4",
         "--lora-r", "2", "--target-module", "q_proj", "--output-dir", str(out), "--checkpoint-steps", "2",
         "--report-to", "tensorboard", "--wait"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "MODELQ_REDIS_URL": redis_url})
    assert done.returncode == 0, done.stderr
    assert "step 4/4  loss " in done.stderr and "left " in done.stderr
    assert "succeeded" in done.stdout
    assert (out / "adapter_model.safetensors").is_file()
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
