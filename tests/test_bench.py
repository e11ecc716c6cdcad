"""A quick smoke of the benchmark harness pieces (bench/).

The figures themselves come from `python -m bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import raw_celery, rss
from bench.__main__ import figures, queue_phase
from bench.env import ROOT, WORKER_ENV, Bench, big_lora, variant, variant_lora
from bench.figures import Figure, Report, percentile
from bench.inprocess import InProcess
from bench.run_jobs import per_step, task_model, task_phase
from bench.side_by_side import load_phase
from bench.synth import TINY, complete, write_model
from schemas import AttachAdapterJob, JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool
from worker.models.resolve import fingerprint


def test_table_and_json_say_median_min_max_target_and_pass(tmp_path: Path) -> None:
    report = Report([Figure("queue_overhead_ratio", 1.5, "<=", [1.2, 1.8, 1.4]),
                     Figure("throughput_ratio", 0.8, ">=", [0.5]),
                     Figure("artifact_cache_speedup", 10, ">=", note="no artifact cache here"),
                     Figure("h2d_copy_gbps", None, ">=", [50.0])])
    lines = report.table().splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == [
        "key", "median", "min", "max", "target", "pass"]
    assert "| 1.4 " in lines[2] and "| 1.2 " in lines[2] and "| 1.8 " in lines[2] and "yes" in lines[2]
    assert "NO" in lines[3]
    assert "n/a" in lines[4] and "- artifact_cache_speedup: no artifact cache here" in lines
    report.write_json(tmp_path / "out.json")
    figures = json.loads((tmp_path / "out.json").read_text())["figures"]
    assert figures["queue_overhead_ratio"] | {"note": None} == {
        "median": 1.4, "min": 1.2, "max": 1.8, "runs": 3, "target": "<= 1.5", "pass": True,
        "unit": "x", "note": None, "samples": [1.2, 1.8, 1.4]}
    merged = Figure.from_json("queue_overhead_ratio", figures["queue_overhead_ratio"])
    assert (merged.samples, merged.target, merged.direction) == ([1.2, 1.8, 1.4], 1.5, "<=")
    assert figures["artifact_cache_speedup"]["median"] is None
    assert figures["h2d_copy_gbps"]["pass"] is None
    assert percentile([3, 1, 2, 4], 50) == 2.5


def test_synthetic_model_loads_with_the_declared_shape(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = write_model(TINY, tmp_path / "tiny", shard_bytes=64 * 1024)
    assert complete(TINY, folder)
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == TINY.parameters()
    assert float(model.model.norm.weight.detach().float().mean()) == 1.0
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert write_model(TINY, folder) == folder  # complete: reused, not rewritten
    assert (folder / "config.json").stat().st_mtime_ns == mtime


def test_variants_share_weights_but_not_identity(tmp_path: Path) -> None:
    base = write_model(TINY, tmp_path / "tiny")
    one, two = variant(base, "1"), variant(base, "2")
    assert (one / "model.safetensors").stat().st_ino == (base / "model.safetensors").stat().st_ino
    assert fingerprint(one) != fingerprint(two)
    lora = variant_lora(big_lora(base), one)
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == str(one)


def test_in_process_baseline_times_a_peft_user(models: dict[str, Path], tmp_path: Path) -> None:
    """Base + adapter from scratch (bf16, and nf4 as a QLoRA user), the adapter again beside it;
    generate and a training loop on a resident model: the in-process sides of the figures."""
    inproc = InProcess(ROOT)
    try:
        times = inproc.adapter(models["llama"], models["lora"])
        assert times.scratch >= times.base > 0 and times.second > 0
        qlora = inproc.adapter(models["llama"], models["lora"], quant="nf4")
        assert qlora.scratch >= qlora.base > 0 and qlora.second > 0
        assert inproc.load(models["llama"]) > 0  # plain loads still answer after it
        seconds, text = inproc.generate(models["llama"], "the quick brown fox", 4)
        assert seconds > 0 and len(text.split()) == 4
        data = tmp_path / "train.jsonl"
        data.write_text('{"text": "the lazy dog"}\n{"text": "a cat sat on the mat"}\n')
        marks = inproc.train(models["llama"], data, 3, 2, 1e-3, {"r": 2, "target_modules": ["q_proj"]})
        assert len(marks) == 3 and marks == sorted(marks) and per_step(marks) > 0
    finally:
        inproc.close()


def test_peak_memory_resets_to_current() -> None:
    after = rss.reset_peak(os.getpid())
    assert 0 < after.rss <= after.peak
    assert rss.read(os.getpid()).peak < after.rss + 64 * 1024**2


def test_gpu_script_fails_clearly_without_cuda() -> None:
    """Without a CUDA device, whatever the host has: CUDA_VISIBLE_DEVICES="" hides every GPU
    from torch (on a GPU host the script would otherwise run the whole GPU bench)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--cpu-test" in done.stderr


@pytest.mark.e2e
def test_raw_celery_baseline_answers_a_noop(redis_url: str, redis_server: RedisServer,
                                            models: dict[str, Path], tmp_path: Path) -> None:
    """Both raw tasks: the bare no-op, and the one reading the model the worker holds."""
    env = {**os.environ, "BENCH_REDIS_URL": redis_url, raw_celery.MODEL_ENV: str(models["llama"])}
    with open(tmp_path / "raw.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", *raw_celery.command("t")], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        app = raw_celery.create_app(redis_url)
        result = app.send_task(raw_celery.TASK, args=[{"job": {}}], queue=raw_celery.QUEUE)
        assert result.get(timeout=90) is None
        result = app.send_task(raw_celery.MODEL_TASK, args=[{"job": {}}], queue=raw_celery.QUEUE)
        assert result.get(timeout=30) == {"ok": True}
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.e2e
def test_an_attach_sent_right_after_a_load_finds_the_model(client: Client, pool: WorkerPool,
                                                           models: dict[str, Path]) -> None:
    """The bench attaches the moment a load's record is terminal: the registry must list it."""
    pool.start("w1")
    loaded = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(timeout=120)
    assert loaded.status is JobStatus.succeeded and loaded.result is not None
    attached = client.submit(AttachAdapterJob(model_key=loaded.result.model_key,
                                              adapter=ModelRef(path=str(models["lora"])))).wait(60)
    assert attached.status is JobStatus.succeeded, attached.error
    assert attached.result is not None and attached.result.adapters == ("default",)


@pytest.mark.e2e
def test_the_three_phases_fill_their_figures(tmp_path: Path) -> None:
    """The bench's queue, task and load phases, once each on tiny models, in one Bench as
    `python -m bench` runs them (one Redis, one raw and one modelq worker for all three):
    every figure they own gets a sample, and the queue ratios come with what they divide
    (each side's p50 and jobs/s: the ratios alone move with the host's load)."""
    report = Report(figures())
    tasks = task_model(tmp_path, "tasks", {"hidden": 64, "layers": 2, "vocab": 256})
    base = write_model(TINY, tmp_path / "models" / "tiny")
    counts = {"latency_rounds": 1, "jobs_per_round": 3, "batches": 1, "batch_size": 4}
    with Bench(cache=tmp_path) as bench:
        queue_phase(bench, report, base, 1, counts, tasks)
        inproc = InProcess(ROOT, env=WORKER_ENV)
        try:
            task_phase(bench, report, tasks, inproc, runs=1, rounds=1, jobs_per_round=3, per_run=1,
                       steps=3)
        finally:
            inproc.close()
        worker, = bench.pool
        load_phase(bench, report, worker, base, big_lora(base), 1, attach="nf4")
    owned = ["queue_overhead_ratio", "throughput_ratio", "cli_status_seconds",
             "run_overhead_ratio", "generate_ratio", "train_step_ratio", "cold_load_ratio_large",
             "cold_load_ratio_nf4", "adapter_attach_speedup", "adapter_attach_ceiling",
             "artifact_cache_speedup", "peak_rss_ratio"]
    assert [key for key in owned if not report.figure(key).available] == []
    assert report.context["tasks"]["generated"]  # the worker's text matched the in-process one
    assert "ms (cache hit) /" in report.figure("queue_overhead_ratio").note
    assert report.figure("throughput_ratio").note.endswith(" jobs/s")
