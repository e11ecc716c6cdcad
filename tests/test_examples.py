"""The examples/ programs against a real Redis and a real worker.

The Trainer callback is driven as a Trainer drives it: `on_save` with its args and
state after a checkpoint folder (here a peft adapter built for the test base) exists.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from examples.trainer_callback import ModelqCheckpointCallback
from schemas import JobStatus, LoadJob, RunResult
from tasks.client import Client
from tests.support.models import TOKENIZER_LINES, build_lora
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e


def test_trainer_callback_attaches_and_scores_each_checkpoint_without_blocking(
        client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path) -> None:
    pool.start("trainer")
    loaded = client.submit(LoadJob(model=str(models["llama"]))).wait(timeout=120)
    assert loaded.status is JobStatus.succeeded, loaded.error
    key = loaded.result.model_key  # type: ignore[union-attr]
    output_dir = tmp_path / "run"
    for step in (10, 20):
        build_lora(models["llama"], output_dir / f"checkpoint-{step}", seed=step)
    texts = list(TOKENIZER_LINES[:2])
    callback = ModelqCheckpointCallback(client, key, texts)
    args: Any = SimpleNamespace(output_dir=str(output_dir))

    started = time.monotonic()
    for step in (10, 20):
        callback.on_save(args, SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    callback.on_save(args, SimpleNamespace(global_step=30, is_world_process_zero=False), None)
    callback.on_save(args, SimpleNamespace(global_step=40, is_world_process_zero=True), None)  # no folder
    assert time.monotonic() - started < 0.5  # training is never held up by modelq
    assert callback.wait(timeout=120)

    assert [(c.step, c.adapter) for c in callback.checkpoints] == [(10, "ckpt-10"), (20, "ckpt-20"),
                                                                   (40, "ckpt-40")]
    missing = callback.checkpoints[2]  # its attach failed: recorded, no evaluation, training went on
    assert missing.attach_job_id is not None and missing.eval_job_id is None
    assert missing.error is not None and "failed" in missing.error
    scores = []
    for checkpoint in callback.checkpoints[:2]:
        assert checkpoint.error is None
        assert checkpoint.attach_job_id is not None and checkpoint.eval_job_id is not None
        attached = client.job(checkpoint.attach_job_id).wait(timeout=60)
        assert attached.status is JobStatus.succeeded, attached.error
        assert checkpoint.adapter in attached.result.adapters  # type: ignore[union-attr]
        evaluated = client.job(checkpoint.eval_job_id).wait(timeout=60)
        assert evaluated.status is JobStatus.succeeded, evaluated.error
        assert isinstance(evaluated.result, RunResult)
        value: Any = evaluated.result.value
        assert [row["tokens"] for row in value] == [len(t.split()) for t in texts]
        scores.append([row["logprob"] for row in value])
    base = client.run("modelq.loglikelihood", model=key, adapters=[], args=[texts]).wait(timeout=60)
    base_scores = [row["logprob"] for row in base.result.value]  # type: ignore[union-attr]
    assert len({tuple(s) for s in (*scores, base_scores)}) == 3  # each scored with its own adapter
    # attached without activating: the later checkpoint did not take over the base
    assert "ckpt-20" not in base.result.model.active_adapters  # type: ignore[union-attr]



def test_trainer_callback_evaluates_each_checkpoint_with_the_harness_as_lm_eval_hf_does(
        client: Client, pool: WorkerPool, models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = Path(__file__).resolve().parent / "data" / "harness"
    monkeypatch.chdir(data)  # the task's data_files path is relative
    pool.start("trainer-harness")
    loaded = client.submit(LoadJob(model=str(models["llama"]), dtype="float32")).wait(timeout=120)
    assert loaded.status is JobStatus.succeeded, loaded.error
    folder = build_lora(models["llama"], tmp_path / "run" / "checkpoint-10", seed=10)
    callback = ModelqCheckpointCallback(client, loaded.result.model_key,  # type: ignore[union-attr]
                                        ["held-out text"], harness_tasks=["modelq_toy_mc"],
                                        include_path=str(data))
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path / "run")),  # type: ignore[arg-type]
                     SimpleNamespace(global_step=10, is_world_process_zero=True), None)  # type: ignore[arg-type]
    assert callback.wait(timeout=240)
    saved = callback.checkpoints[0]
    assert saved.error is None and saved.harness is not None
    expected = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={models['llama']},peft={folder},dtype=float32", device="cpu",
        tasks=["modelq_toy_mc"], task_manager=TaskManager(include_path=str(data), include_defaults=False))
    for metric in ("acc,none", "acc_norm,none"):
        assert saved.harness["modelq_toy_mc"][metric] == expected["results"]["modelq_toy_mc"][metric], metric
