"""The HTTP gateway end to end: a running uvicorn, real Redis and a real worker, over httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from schemas import AccessDenied, InvalidJob, parse_job
from tasks.gateway import create_gateway
from tasks.settings import Settings
from tests.support.workers import WorkerPool


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve(app: FastAPI) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def gateway(settings: Settings) -> Iterator[httpx.Client]:
    for url in serve(create_gateway(settings)):
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http


def sse(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Read a job's event stream to its end: the parsed SSE messages (id, event, data)."""
    messages, current = [], {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if current:
                    messages.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return messages


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


@pytest.mark.e2e
def test_jobs_through_http(gateway: httpx.Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    docs = gateway.get("/openapi.json").json()
    assert {"/v1/jobs/load", "/v1/jobs/attach", "/v1/jobs/unload", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/cancel", "/v1/workers"} <= set(docs["paths"])
    assert "swagger" in gateway.get("/docs").text.lower()
    assert gateway.get("/healthz").json() == {"redis": "ok"}
    pool.start("gw1")

    submitted = gateway.post("/v1/jobs/load", json={"model": {"path": str(models["llama"])},
                                                     "quantization": {"method": "nf4"}})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["status"] == "queued" and job["kind"] == "load" and job["tenant"] == "default"
    assert submitted.headers["location"] == f"/v1/jobs/{job['job_id']}"

    messages = sse(gateway, job["job_id"])
    assert [m["event"] for m in messages][0] == "queued" and messages[-1]["event"] == "succeeded"
    assert "running" in {m["event"] for m in messages}
    assert all(m["data"]["job_id"] == job["job_id"] and m["id"] for m in messages)
    resumed = gateway.get(f"/v1/jobs/{job['job_id']}/events",
                          headers={"Last-Event-ID": messages[-2]["id"]})
    assert resumed.text.count("\ndata: ") == 1  # only what came after that id

    record = gateway.get(f"/v1/jobs/{job['job_id']}").json()
    assert record["status"] == "succeeded" and record["result"]["quantization"] == "nf4"
    key = record["result"]["model_key"]
    workers = gateway.get("/v1/workers").json()
    assert [(w["name"], [m["model_key"] for m in w["models"]]) for w in workers] == [("gw1", [key])]

    attach = gateway.post("/v1/jobs/attach", json={"model_key": key, "adapter": {"path": str(models["lora"])},
                                                   "name": "mine"}).json()
    assert sse(gateway, attach["job_id"])[-1]["event"] == "succeeded"
    assert gateway.get(f"/v1/jobs/{attach['job_id']}").json()["result"]["adapters"] == ["mine"]

    # a finished job can't be cancelled; the record says what it is
    assert gateway.post(f"/v1/jobs/{attach['job_id']}/cancel").json()["status"] == "succeeded"

    unload = gateway.post("/v1/jobs", json={"kind": "unload", "model_key": key}).json()
    assert sse(gateway, unload["job_id"])[-1]["event"] == "succeeded"
    assert gateway.get("/v1/workers").json()[0]["models"] == []

    # the same validation and errors as the CLI
    bad = {"model": {"path": str(models["llama"])}, "quantization": {"method": "nf5"}}
    with pytest.raises(InvalidJob) as cli_error:
        parse_job({"kind": "load", **bad})
    assert error_of(gateway.post("/v1/jobs/load", json=bad), 422) == {
        "type": "InvalidJob", "message": cli_error.value.message, "retryable": False}
    assert error_of(gateway.post("/v1/jobs/unload", json={"kind": "load"}), 422)["type"] == "InvalidJob"
    assert error_of(gateway.post("/v1/jobs/load", content=b"not json",
                                 headers={"content-type": "application/json"}), 400)["type"] == "InvalidJob"
    assert error_of(gateway.get("/v1/jobs/nope"), 404)["type"] == "JobNotFound"
    assert error_of(gateway.post("/v1/jobs/nope/cancel"), 404)["type"] == "JobNotFound"
    gone = error_of(gateway.post("/v1/jobs/attach",
                                 json={"model_key": key, "adapter": str(models["lora"])}), 404)
    assert gone["type"] == "ModelNotFound" and "load it first" in gone["message"]


def test_api_keys_pick_the_tenant_and_hide_other_tenants_jobs(settings: Settings,
                                                              models: dict[str, Path]) -> None:
    keys = {"k-acme": "acme", "k-beta": "beta"}

    def authenticate(api_key: str | None) -> str:
        if api_key not in keys:
            raise AccessDenied("unknown or missing API key: send `Authorization: Bearer <key>`")
        return keys[api_key]

    http = TestClient(create_gateway(settings, authenticate))
    load = {"model": {"path": str(models["llama"])}}
    assert error_of(http.post("/v1/jobs/load", json=load), 401)["type"] == "AccessDenied"
    assert http.post("/v1/jobs/load", json=load, headers={"X-API-Key": "wrong"}).status_code == 401
    acme = {"Authorization": "Bearer k-acme"}
    job = http.post("/v1/jobs/load", json=load, headers=acme).json()
    assert job["tenant"] == "acme"
    assert http.get(f"/v1/jobs/{job['job_id']}", headers=acme).status_code == 200
    assert http.get(f"/v1/jobs/{job['job_id']}", headers={"X-API-Key": "k-beta"}).status_code == 404
    assert error_of(http.post("/v1/jobs/load", json={**load, "tenant": "beta"}, headers=acme), 403)["type"] \
        == "AccessDenied"


def test_redis_down_is_503(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, redis_url=f"redis://127.0.0.1:{_free_port()}/0",
                        connect_timeout_seconds=1)
    http = TestClient(create_gateway(settings))
    for response in (http.post("/v1/jobs/load", json={"model": {"repo_id": "org/model"}}),
                     http.get("/v1/jobs/abc"), http.get("/v1/workers"), http.get("/healthz")):
        error = error_of(response, 503)
        assert error["type"] == "BrokerUnavailable" and error["retryable"] is True
