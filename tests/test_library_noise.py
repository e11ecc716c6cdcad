"""Third-party libraries' own warnings stay out of a worker's log unless `modelq -v`:
bitsandbytes' kernel notice at start, transformers' FutureWarning at the first attach."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import AttachAdapterJob, JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e

NOISE = ("gemm_4bit_forward", "is_gradient_checkpointing")


def _noise() -> tuple[str, ...]:
    """The notices this machine's libraries give: bitsandbytes looks for its CPU 4-bit kernel
    (and warns that it is missing) only on a CPU with AVX512-BF16."""
    from bitsandbytes.functional import has_avx512bf16

    return NOISE if has_avx512bf16() else NOISE[1:]


def _load_and_attach(client: Client, models: dict[str, Path]) -> None:
    loaded = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(120)
    assert loaded.status is JobStatus.succeeded and loaded.result is not None, loaded.error
    attach = client.submit(AttachAdapterJob(model_key=loaded.result.model_key,
                                            adapter=ModelRef(path=str(models["lora"])), name="a"))
    assert attach.wait(120).status is JobStatus.succeeded


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "-v"])
def test_library_warnings_only_with_v(client: Client, pool: WorkerPool, models: dict[str, Path],
                                      verbose: bool) -> None:
    worker = pool.start("w1", cli_args=("-v",) if verbose else ())
    _load_and_attach(client, models)
    log = worker.log_text()
    noise = _noise()
    assert [line in log for line in noise] == [verbose] * len(noise), log[-3000:]
