"""An adapter built for a base of another size fails as AdapterIncompatible, not retryable,
naming the tensor and both shapes; the resident model is left as it was."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub

from schemas import AttachAdapterJob, JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tests.support.models import build_lora, build_model
from tests.support.workers import WorkerPool
from worker.errors import translate

TORCH_SAYS = ("Error(s) in loading state_dict for PeftModelForCausalLM:\n\tsize mismatch for "
              "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight: copying a "
              "param with shape torch.Size([4, 32]) from checkpoint, the shape in current model "
              "is torch.Size([4, 64]).")


def test_torch_size_mismatch_names_the_tensor_and_both_shapes() -> None:
    error = translate(RuntimeError(TORCH_SAYS), ref="ad")
    assert (error.type, error.retryable) == ("AdapterIncompatible", False)
    assert error.details["adapter_shape"] == [4, 32] and error.details["model_shape"] == [4, 64]
    assert "q_proj.lora_A.default.weight is [4, 32] in the adapter but [4, 64]" in error.message


def test_hub_outage_is_retryable_and_offline_mode_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for exc in (httpx.ConnectError("down"), hub.LocalEntryNotFoundError("no cache, no hub")):
        error = translate(exc, ref="org/m")
        assert (error.type, error.retryable) == ("HubUnavailable", True)
        assert "HF_HUB_OFFLINE" not in error.message
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    error = translate(hub.LocalEntryNotFoundError("x"), ref="org/m")
    assert (error.type, error.retryable) == ("ModelNotFound", False)
    assert "unset HF_HUB_OFFLINE" in error.message


@pytest.mark.e2e
def test_adapter_for_a_narrower_base_is_refused(client: Client, pool: WorkerPool,
                                               models: dict[str, Path], tmp_path: Path) -> None:
    narrow = build_model("llama", tmp_path / "narrow", hidden=32)
    # Names the 64-wide llama as its base: only the shapes tell them apart.
    adapter = build_lora(narrow, tmp_path / "narrow-lora", base_name=str(models["llama"]))
    pool.start("w1")
    loaded = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(120)
    assert loaded.status is JobStatus.succeeded and loaded.result is not None, loaded.error
    key = loaded.result.model_key

    attach = client.submit(AttachAdapterJob(model_key=key, adapter=ModelRef(path=str(adapter)),
                                            name="narrow"))
    record = attach.wait(120)
    assert record.status is JobStatus.failed and record.error is not None
    assert (record.error.type, record.error.retryable) == ("AdapterIncompatible", False)
    assert "lora_A.weight is [4, 32] in the adapter but [4, 64] in the model" in record.error.message
    with_it = client.submit(LoadJob(model=ModelRef(path=str(adapter)))).wait(120)  # via its base
    assert with_it.error is not None and with_it.error.type == "AdapterIncompatible"

    good = client.submit(AttachAdapterJob(model_key=key, adapter=ModelRef(path=str(models["lora"])),
                                          name="ok"))
    assert good.wait(120).status is JobStatus.succeeded  # the failed attach changed nothing
