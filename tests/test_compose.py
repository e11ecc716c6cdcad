"""docker-compose.yml, the Dockerfile and deploy/prometheus.yml: the structure a GPU server relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("command", [None])[0] == "worker"}


def test_redis_keeps_an_aof_behind_a_password(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert "--appendonly yes" in command and "--requirepass ${MODELQ_REDIS_PASSWORD" in command
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_one_worker_per_gpu_sharing_the_hub_cache(compose: dict[str, Any]) -> None:
    found = workers(compose)
    assert len(found) >= 2
    device_ids, names = [], []
    for service in found.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        device_ids += device["device_ids"]
        command = service["command"]
        names.append(command[command.index("--name") + 1])
        assert command[command.index("--device") + 1] == "cuda:0"  # the one GPU the container sees
        assert "--metrics-port" in command
        assert "hub-cache:/cache/huggingface" in service["volumes"]
        assert service["environment"]["HF_HOME"] == "/cache/huggingface"
        assert service["environment"]["MODELQ_REDIS_URL"].startswith("redis://:${MODELQ_REDIS_PASSWORD")
        assert service["environment"]["MODELQ_WORKER_NAME"] == names[-1]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"][0] == "CMD-SHELL"
    assert len(set(device_ids)) == len(device_ids) == len(found)
    assert len(set(names)) == len(names)
    assert "hub-cache" in compose["volumes"]


def test_gateway_and_optional_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["command"][0] == "gateway" and "127.0.0.1:8000:8000" in gateway["ports"]
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert services["flower"]["profiles"] == ["flower"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert all("profiles" not in s for n, s in services.items() if n not in ("flower", "prometheus"))
    assert all("healthcheck" in s for s in services.values())
    mount = services["prometheus"]["volumes"][0].split(":")[0]
    prometheus = yaml.safe_load((ROOT / mount).read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == sorted(workers(compose))


def test_the_dockerfile_builds_what_compose_runs(compose: dict[str, Any]) -> None:
    assert all(s.get("build") == "." for s in workers(compose).values())
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["modelq"]' in dockerfile and '".[worker,gateway]"' in dockerfile
    assert "USER modelq" in dockerfile
