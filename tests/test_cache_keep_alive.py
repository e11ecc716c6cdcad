"""Keep-alive against running jobs, in-process on a fake clock (worker/models/cache.py).

A model's keep-alive counts from the end of the job that used it, and the keep-alive sweep
checks each model again under the cache's lock before it unloads it: a job that takes the
model after the sweep's snapshot keeps it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from schemas import BaseModelInfo, ModelInfo
from worker.models.cache import Entry, ModelCache
from worker.models.resolve import Source


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _entry(key: str, keep_alive: float | None = 5.0) -> Entry:
    info = ModelInfo(model_key=key, model_class="X", base_model=BaseModelInfo(ref="r", path="/r"),
                     num_parameters=1, footprint_bytes=10, dtype="float32", quantization="none",
                     device_map={"": "cpu"})
    return Entry(key=key, model=torch.nn.Linear(1, 1), info=info, base=Source(ref="r", path=Path("/r")),
                 tenant="default", bytes=10, keep_alive=keep_alive)


def test_keep_alive_counts_from_the_end_of_a_job_longer_than_it() -> None:
    clock = Clock()
    cache = ModelCache(100, clock=clock)
    cache.put(_entry("m"))
    with cache.using("m"):  # a 60 s job on a model kept alive 5 s
        clock.now += 60
        assert cache.expire() == [] and cache.evict_idle() == []  # busy: neither sweep takes it
    clock.now += 4.9
    assert cache.expire() == []  # 4.9 s after the job ended, not 64.9 s after it started
    assert cache.peek("m") is not None
    clock.now += 0.1
    assert cache.expire() == ["m"] and cache.peek("m") is None


def test_the_sweep_rechecks_under_the_lock_a_model_a_job_took_after_its_snapshot() -> None:
    clock = Clock()
    cache = ModelCache(100, clock=clock)
    cache.put(_entry("taken"))
    cache.put(_entry("used"))
    cache.put(_entry("idle"))
    clock.now += 6  # every keep-alive has passed
    snapshot = cache.evictable
    job = cache.using("taken")

    def racing_snapshot() -> list[Entry]:
        found = snapshot()  # the sweep's snapshot lists all three as expired ...
        job.__enter__()  # ... then a job starts on one
        cache.get("used")  # and another is used (its keep-alive starts again)
        return found

    cache.evictable = racing_snapshot  # type: ignore[method-assign]
    assert cache.expire() == ["idle"]
    assert cache.peek("taken") is not None and cache.peek("used") is not None
    assert cache.peek("taken").model is not None  # type: ignore[union-attr]
    cache.evictable = snapshot  # type: ignore[method-assign]
    job.__exit__(None, None, None)
    clock.now += 5
    assert sorted(cache.expire()) == ["taken", "used"]
