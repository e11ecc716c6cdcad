"""A first end-to-end pass: one worker, a plain load, a cache hit, an nf4 load with an adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import AdapterSpec, JobStatus, LoadJob, ModelRef, QuantizationSpec
from tasks.client import Client
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e


def test_load_then_cache_hit_then_nf4_with_adapter(client: Client, pool: WorkerPool,
                                                   models: dict[str, Path]) -> None:
    pool.start("w1")
    plain = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(timeout=120)
    assert plain.status is JobStatus.succeeded, plain.error
    assert plain.result is not None and plain.result.model_class == "LlamaForCausalLM"
    assert plain.result.cache_hit is False

    again = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(timeout=60)
    assert again.result is not None and again.result.cache_hit is True
    assert again.result.model_key == plain.result.model_key

    nf4 = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])),
                                quantization=QuantizationSpec(method="nf4"),
                                adapters=(AdapterSpec(ref=str(models["lora"])),))).wait(timeout=120)
    assert nf4.status is JobStatus.succeeded, nf4.error
    assert nf4.result is not None
    assert nf4.result.model_key != plain.result.model_key
    assert nf4.result.footprint_bytes < plain.result.footprint_bytes
    assert nf4.result.adapters == ("default",)
