"""The byte-accounted cache and the estimate, in-process: eviction order, pinning,
keep-alive expiry on a fake clock, InsufficientMemory, and estimates against footprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas import BaseModelInfo, InsufficientMemory, LoadJob, ModelInfo, ModelRef
from worker import loader
from worker.cache import Entry, ModelCache
from worker.estimate import estimate
from worker.progress import Reporter
from worker.resolve import Source, resolve


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
