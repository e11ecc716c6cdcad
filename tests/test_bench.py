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
from bench.env import ROOT, big_lora, variant, variant_lora
from bench.figures import Figure, Report, percentile
from bench.synth import TINY, complete, write_model
from schemas import AttachAdapterJob, JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool
from worker.resolve import fingerprint


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
        "unit": "x", "note": None}
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


def test_in_process_baseline_times_a_peft_user(models: dict[str, Path]) -> None:
    """Base + adapter from scratch, and the adapter again beside it: the attach ceiling's two sides."""
    from bench.inprocess import InProcess

    inproc = InProcess(ROOT)
    try:
        scratch, second = inproc.adapter(models["llama"], models["lora"])
        assert scratch > 0 and second > 0
        assert inproc.load(models["llama"]) > 0  # plain loads still answer after it
    finally:
        inproc.close()


def test_peak_memory_resets_to_current() -> None:
    after = rss.reset_peak(os.getpid())
    assert 0 < after.rss <= after.peak
    assert rss.read(os.getpid()).peak < after.rss + 64 * 1024**2


def test_gpu_script_fails_clearly_without_cuda() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--cpu-test" in done.stderr


@pytest.mark.e2e
def test_raw_celery_baseline_answers_a_noop(redis_url: str, redis_server: RedisServer,
                                            tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    with open(tmp_path / "raw.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", *raw_celery.command("t")], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        app = raw_celery.create_app(redis_url)
        result = app.send_task(raw_celery.TASK, args=[{"job": {}}], queue=raw_celery.QUEUE)
        assert result.get(timeout=90) is None
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
