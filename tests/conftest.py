"""Shared fixtures: a real redis-server for the session, flushed per test; worker pools.

End-to-end tests start real `modelq worker` subprocesses (tests/support/workers.py)
against that server; models are tiny ones built on disk by tests/support/models.py.
Tests marked `gpu` (`@pytest.mark.gpu`, or `gpu(devices=2)` for more than one) run only
where torch sees that many CUDA devices, and are skipped with the reason everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.client import Client
from tasks.settings import Settings
from tests.support.models import build_lora, build_model
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, before any fixture starts, where torch sees too few CUDA devices."""
    wanted = [(item, marker) for item in items if (marker := item.get_closest_marker("gpu"))]
    if not wanted:
        return
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item, marker in wanted:
        needed = int(marker.kwargs.get("devices", 1))
        if found < needed:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {needed} CUDA device{'s' if needed > 1 else ''}; "
                       f"torch.cuda sees {found}"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's server, emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, heartbeat_seconds=0.5, worker_ttl_seconds=3,
                    connect_timeout_seconds=2)


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(settings)


@pytest.fixture
def pool(redis_url: str, tmp_path: Path) -> Iterator[WorkerPool]:
    """Start workers with `pool.start(name, *args)`; all are stopped after the test."""
    workers = WorkerPool(redis_url, tmp_path)
    yield workers
    workers.stop_all()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models and adapters, built once per session."""
    root = tmp_path_factory.mktemp("models")
    out = {
        "llama": build_model("llama", root / "llama"),
        "qwen2": build_model("qwen2", root / "qwen2", seed=1),
        "mistral": build_model("mistral", root / "mistral", sharded=True, seed=2),
    }
    out["lora"] = build_lora(out["llama"], root / "lora", seed=3)
    out["lora2"] = build_lora(out["llama"], root / "lora2", seed=4, target_modules=("k_proj", "o_proj"))
    out["qwen_lora"] = build_lora(out["qwen2"], root / "qwen_lora", seed=5)
    return out
