"""worker/handlers in-process: switching the active adapter really changes what the
resident model computes (the end-to-end tests see the same through records only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from schemas import AdapterIncompatible, AttachAdapterJob, LoadJob
from worker.handlers import Handler, local_handlers
from worker.jobs.progress import Reporter
from worker.models.cache import ModelCache

INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 3]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(INPUT_IDS).logits
    return out


def _reference(models: dict[str, Path], adapter: str) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    return _logits(PeftModel.from_pretrained(base, str(models[adapter])))


def _handlers() -> tuple[dict[str, Handler], ModelCache]:
    """A single-tenant worker's handlers over a fresh cache, in this process."""
    cache = ModelCache(2**30)
    return dict(local_handlers(cache, name="w")), cache


def test_switching_the_active_adapter_changes_the_outputs(models: dict[str, Path]) -> None:
    handlers, cache = _handlers()
    reporter = Reporter(lambda *_: None, lambda: False)
    info = handlers["load"].run(LoadJob.model_validate({
        "model": str(models["llama"]), "active_adapter": "a",
        "adapters": [{"ref": str(models["lora"]), "name": "a"}, {"ref": str(models["lora2"]), "name": "b"}],
    }), reporter)
    assert info.adapters == ("a", "b") and info.active_adapters == ("a",)
    model = cache.get(info.model_key).model  # type: ignore[union-attr]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with_a = _logits(model)
    torch.testing.assert_close(with_a, _reference(models, "lora"))

    switched = handlers["attach"].run(AttachAdapterJob(model_key=info.model_key, adapter=str(models["lora2"]),
                                               name="b"), reporter)
    assert switched.active_adapters == ("b",) and switched.adapters == ("a", "b")
    model = cache.get(info.model_key).model  # type: ignore[union-attr]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with_b = _logits(model)
    torch.testing.assert_close(with_b, _reference(models, "lora2"))
    assert not torch.allclose(with_a, with_b)

    with pytest.raises(AdapterIncompatible, match="trained on"):
        handlers["attach"].run(AttachAdapterJob(model_key=info.model_key, adapter=str(models["qwen_lora"]),
                                        name="q"), reporter)
    after = handlers["attach"].run(AttachAdapterJob(model_key=info.model_key, adapter=str(models["lora"]),
                                            name="a"), reporter)
    assert after.adapters == ("a", "b") and after.active_adapters == ("a",)
    torch.testing.assert_close(_logits(cache.get(info.model_key).model), with_a)  # type: ignore[union-attr]


def test_cached_serves_only_a_load_the_cache_holds_as_asked(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "llama"
    shutil.copytree(models["llama"], folder)
    handlers, _cache = _handlers()
    job = LoadJob(model=str(folder))
    assert handlers["load"].cached(job) is None  # nothing resident yet
    loaded = handlers["load"].run(job, Reporter(lambda *_: None, lambda: False))
    info = handlers["load"].cached(job)
    assert info is not None and info.cache_hit and info.model_key == loaded.model_key
    assert info.footprint_bytes == loaded.footprint_bytes and info.worker == "w"
    assert handlers["load"].cached(job.model_copy(update={"pin": True})) is None  # it would change the entry
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert handlers["load"].cached(job) is None  # the folder changed: a new model, loaded in full
