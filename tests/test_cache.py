"""The byte-accounted cache and the estimate, in-process: eviction order, pinning,
keep-alive expiry on a fake clock, InsufficientMemory, and estimates against footprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from schemas import BaseModelInfo, InsufficientMemory, LoadJob, ModelInfo, ModelRef
from worker.jobs.progress import Reporter
from worker.models import loader
from worker.models.cache import Entry, ModelCache
from worker.models.estimate import _model_bytes, estimate
from worker.models.resolve import CONFIG, Source, read_json, resolve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _entry(key: str, size: int, *, pinned: bool = False, keep_alive: float | None = None) -> Entry:
    info = ModelInfo(model_key=key, model_class="X", base_model=BaseModelInfo(ref="r", path="/r"),
                     num_parameters=1, footprint_bytes=size, dtype="float32", quantization="none",
                     device_map={"": "cpu"})
    return Entry(key=key, model=torch.nn.Linear(1, 1), info=info, base=Source(ref="r", path=Path("/r")),
                 tenant="default", bytes=size, pinned=pinned, keep_alive=keep_alive)


def test_lru_eviction_skips_pinned_and_busy_and_refuses_what_cannot_fit() -> None:
    clock = Clock()
    cache = ModelCache(100, clock=clock)
    for key, pinned in (("a", True), ("b", False), ("c", False), ("d", False)):
        cache.put(_entry(key, 25, pinned=pinned))
        clock.now += 1
    cache.get("b")  # b is now the most recently used
    cache.busy = "c"  # the running job's model
    evictions: list[int] = []
    cache.on_evict = evictions.append  # what the worker's metrics count
    assert cache.free == 0
    assert cache.make_room(40) == ["d", "b"]  # LRU first; pinned a and busy c stay
    assert evictions == [2]
    assert {e.key for e in cache.entries()} == {"a", "c"}
    with pytest.raises(InsufficientMemory) as err:
        cache.make_room(60)
    assert err.value.details["needed_bytes"] == 60 and err.value.details["free_bytes"] == 50
    assert {e.key for e in cache.entries()} == {"a", "c"}  # nothing evicted in vain
    assert evictions == [2]


def test_keep_alive_expires_idle_unpinned_models_only() -> None:
    clock = Clock()
    cache = ModelCache(100, clock=clock)
    cache.put(_entry("short", 10, keep_alive=5))
    cache.put(_entry("pinned", 10, pinned=True, keep_alive=5))
    cache.put(_entry("forever", 10))
    clock.now += 4
    assert cache.expire() == []
    cache.get("short")  # use restarts its keep-alive
    clock.now += 4
    assert cache.expire() == []
    clock.now += 1
    assert cache.expire() == ["short"]
    assert sorted(e.key for e in cache.entries()) == ["forever", "pinned"]


@pytest.mark.parametrize("kind,dtype,quant", [
    ("llama", "auto", "none"), ("qwen2", "bfloat16", "int8"), ("mistral", "auto", "nf4"),
    ("llama", "float16", {"method": "fp4", "double_quant": True}),
])
def test_estimate_matches_the_loaded_footprint(models: dict[str, Path], kind: str, dtype: str,
                                               quant: object) -> None:
    job = LoadJob(model=ModelRef(path=str(models[kind])), dtype=dtype, quantization=quant)
    resolved = resolve(job.model)
    predicted = estimate(resolved.base.path, resolved.config, job)
    model = loader.load(resolved, job, "cpu", Reporter(lambda *_: None, lambda: False))
    assert abs(predicted - loader.footprint(model)) <= 0.05 * loader.footprint(model)


def test_estimates_are_cached_per_config_and_follow_a_changed_folder(models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    source, copy = models["llama"], tmp_path / "copy"
    shutil.copytree(source, copy)
    job = LoadJob(model=ModelRef(path=str(copy)), dtype="bfloat16")
    _model_bytes.cache_clear()
    first = estimate(source, read_json(source / CONFIG), job)
    assert estimate(copy, read_json(copy / CONFIG), job) == first  # same config: no second build
    assert _model_bytes.cache_info().hits == 1
    config = read_json(copy / CONFIG)
    config["num_hidden_layers"] = 1  # a changed config.json is another model
    (copy / CONFIG).write_text(json.dumps(config))
    resolved = resolve(job.model)
    smaller = estimate(copy, resolved.config, job)
    model = loader.load(resolved, job, "cpu", Reporter(lambda *_: None, lambda: False))
    assert smaller == loader.footprint(model) < first


def test_auto_dtype_without_a_named_dtype_follows_the_weights(models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bf16"
    shutil.copytree(models["llama"], folder)
    config = read_json(folder / CONFIG)
    del config["dtype"]
    (folder / CONFIG).write_text(json.dumps(config))
    auto = LoadJob(model=ModelRef(path=str(folder)), dtype="auto")
    as_float32 = estimate(folder, config, auto)
    weights = folder / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    as_bfloat16 = estimate(folder, config, auto)  # the same config, other weights: not a stale hit
    assert as_bfloat16 == estimate(folder, config, LoadJob(model=auto.model, dtype="bfloat16"))
    assert as_bfloat16 < as_float32
