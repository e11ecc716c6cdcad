"""The CUDA paths, end to end: real `modelq worker --device cuda:N` processes on real GPUs.

Marked `gpu`: tests/conftest.py skips them, with the reason, where torch sees no CUDA device
(or fewer than a test's `devices`), so they cost a CPU-only run nothing. On a GPU host they
check what the CPU suite cannot: a 4-bit (nf4) load through bitsandbytes' CUDA kernels, a
model split between the GPU and the CPU, and one worker per GPU, each pinned to its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import JobRecord, JobStatus, LoadJob, ModelInfo, ModelRef, RunResult
from tasks.client import Client
from tasks.state.keys import worker_queue
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]


def loaded(client: Client, job: LoadJob) -> ModelInfo:
    record = client.submit(job).wait(timeout=300)
    assert record.status is JobStatus.succeeded, record.error
    assert isinstance(record.result, ModelInfo)
    return record.result


def generated(client: Client, key: str) -> tuple[JobRecord, list[str]]:
    """`modelq.generate` on the resident model `key`: its record and the texts."""
    record = client.run("modelq.generate", model=key,
                        kwargs={"prompts": "the quick brown", "max_new_tokens": 4}).wait(timeout=300)
    assert record.status is JobStatus.succeeded, record.error
    assert isinstance(record.result, RunResult) and isinstance(record.result.value, list)
    return record, [str(text) for text in record.result.value]


def test_an_nf4_load_on_a_gpu_worker_is_4_bit_on_the_gpu_and_generates(
        client: Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    pool.start("gpu0", device="cuda:0", timeout=300)
    plain = loaded(client, LoadJob(model=ModelRef(path=str(models["llama"])), dtype="bfloat16"))
    nf4 = loaded(client, LoadJob(model=ModelRef(path=str(models["llama"])), dtype="bfloat16",
                                 quantization="nf4"))
    assert nf4.quantization == "nf4" and nf4.device_map == {"": "cuda:0"}
    assert plain.device_map == {"": "cuda:0"} and nf4.model_key != plain.model_key
    assert nf4.num_parameters == plain.num_parameters  # packed 4-bit weights counted unpacked
    assert nf4.footprint_bytes < plain.footprint_bytes
    record, texts = generated(client, nf4.model_key)
    assert record.device == "cuda:0" and len(texts) == 1 and texts[0].strip()


def test_a_model_split_between_the_gpu_and_the_cpu_runs_across_both(
        client: Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    pool.start("gpu0", device="cuda:0", timeout=300)
    split = loaded(client, LoadJob.model_validate({
        "model": str(models["qwen2"]), "placement": {"device_map": {"model": "cuda", "lm_head": "cpu"}}}))
    assert split.device_map == {"model": "cuda:0", "lm_head": "cpu"}
    whole = loaded(client, LoadJob(model=ModelRef(path=str(models["qwen2"]))))
    assert whole.device_map == {"": "cuda:0"} and whole.model_key != split.model_key
    for key in (split.model_key, whole.model_key):
        _, texts = generated(client, key)  # the split one: activations cross from GPU to CPU
        assert len(texts) == 1 and texts[0].strip()


@pytest.mark.gpu(devices=2)
def test_one_worker_per_gpu_each_pinned_to_its_own(client: Client, pool: WorkerPool,
                                                  models: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    workers = [pool.start(f"gpu{n}", device=f"cuda:{n}", wait=False) for n in (0, 1)]
    for worker in workers:
        pool.wait_registered(worker, timeout=300)
    assert {w.name: w.device for w in client.workers()} == {"gpu0": "cuda:0", "gpu1": "cuda:1"}
    keys = {}
    for n, model in enumerate(("llama", "qwen2")):
        monkeypatch.setattr(client.registry, "queue_for",
                            lambda job, route, n=n: worker_queue(f"gpu{n}"))
        info = loaded(client, LoadJob(model=ModelRef(path=str(models[model]))))
        assert info.device_map == {"": "cuda:0"}  # each process sees its one GPU as cuda:0
        keys[n] = info.model_key
    monkeypatch.undo()  # run jobs are routed to the worker that holds their model
    holders = {w.name: (w.device, w.holds(keys[0]), w.holds(keys[1])) for w in client.workers()}
    assert holders == {"gpu0": ("cuda:0", True, False), "gpu1": ("cuda:1", False, True)}
    for n in (0, 1):
        record, texts = generated(client, keys[n])
        assert (record.worker, record.device) == (f"gpu{n}", f"cuda:{n}") and texts[0].strip()
