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
    assert 'ENTRYPOINT ["modelq"]' in dockerfile and '".[worker,gateway,flower]"' in dockerfile
    assert "USER modelq" in dockerfile


def test_flower_runs_modelqs_app_behind_auth_with_no_secret_on_its_command_line(
        compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["flower"] and flower["image"] == "modelq:latest"
    shell, flag, script = flower["entrypoint"]
    assert (shell, flag) == ("sh", "-c") and "command" not in flower
    # Refuses to start without users; then Flower runs modelq's app, which reads MODELQ_REDIS_URL.
    assert script.startswith(': "$${FLOWER_BASIC_AUTH:?')
    assert script.split("; ", 1)[1].startswith("exec celery -A tasks.app:app flower ")
    assert "redis" not in script and "PASSWORD" not in script and "--broker" not in script
    env = flower["environment"]
    assert env["MODELQ_REDIS_URL"].startswith("redis://:${MODELQ_REDIS_PASSWORD")
    assert env["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"  # no error in other profiles
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])  # Flower serves it without auth


def test_no_service_but_redis_has_a_secret_on_its_command_line(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name != "redis":  # redis-server replaces its process title with its address
            line = " ".join(service.get("entrypoint", []) + service.get("command", []))
            assert "PASSWORD" not in line and "redis://" not in line, name


def test_workers_can_send_task_events_from_the_start(compose: dict[str, Any]) -> None:
    for service in workers(compose).values():
        assert service["environment"]["MODELQ_WORKER_EVENTS"] == "${MODELQ_WORKER_EVENTS:-0}"
