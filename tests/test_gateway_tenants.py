"""The HTTP gateway with a tenants file, end to end: API keys are tenant keys, each tenant's
jobs are signed with its key and run on a real worker, and a tenant sees (and touches) only its
own jobs and models. One worker, one gateway, two tenants; assertions over HTTP with httpx."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tasks.client import Client
from tasks.gateway.api import create_gateway
from tasks.settings import Settings
from tasks.state.keys import Keys, tenant_queues
from tasks.tenants import load_tenants
from tests.support.models import build_hub_cache
from tests.support.tenancy import copy_into, dump_redis, write_tenants
from tests.support.workers import WorkerPool
from tests.test_gateway import error_of, serve, sse

pytestmark = pytest.mark.e2e

KEYS = {t: f"GWKEYMARKER-{t}-0123456789abcdef" for t in ("alice", "bob")}


@contextmanager
def gateway(settings: Settings, tenants_file: Path) -> Iterator[dict[str, httpx.Client]]:
    """The gateway as `modelq gateway` builds it with MODELQ_TENANTS_FILE set: one httpx client
    per caller (alice, bob, and 'anon' with no key); every response is kept in `seen`.

    The gateway's own environment names a tenant (MODELQ_TENANT=bob): with a tenants file
    it must act for each caller's tenant regardless."""
    settings = settings.model_copy(update={"tenants_file": tenants_file, "tenant": "bob"})
    app = create_gateway(settings, tenants=load_tenants(settings.tenants_file))
    seen: list[str] = []

    def keep(response: httpx.Response) -> None:
        response.read()  # an SSE stream here is a finished job's: it ends
        seen.append(f"{response.headers}\n{response.text}")

    with ExitStack() as stack:
        url = stack.enter_context(contextmanager(serve)(app))
        callers = {who: stack.enter_context(httpx.Client(
            base_url=url, timeout=60, event_hooks={"response": [keep]},
            headers={} if who == "anon" else {"Authorization": f"Bearer {KEYS[who]}"}))
            for who in ("alice", "bob", "anon")}
        callers["anon"].seen = seen  # type: ignore[attr-defined]
        yield callers


def finished(http: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Poll the job's record through the gateway until it is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        assert time.monotonic() < deadline, f"job {job_id} still {record['status']}"
        time.sleep(0.1)


def submitted(response: httpx.Response, tenant: str) -> str:
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    assert response.json()["tenant"] == tenant
    return job_id


def job_count(client: Client, *tenants: str) -> int:
    """How many job records exist for `tenants` (and how many messages wait in their queues)."""
    keys = Keys()
    records = sum(client.redis.zcard(keys.jobs(t)) for t in tenants)
    waiting = sum(client.redis.llen(q) for t in tenants for q in tenant_queues(t))
    return int(records + waiting)


def model_keys(http: httpx.Client) -> dict[str, list[str]]:
    response = http.get("/v1/workers")
    assert response.status_code == 200, response.text
    return {m["model_key"]: m["adapters"] for w in response.json() for m in w["models"]}


def test_gateway_with_tenants(client: Client, pool: WorkerPool, settings: Settings,
                              models: dict[str, Path], tmp_path: Path,
                              caplog: pytest.LogCaptureFixture) -> None:
    for logger in ("tasks", "uvicorn"):  # the gateway's own logs
        caplog.set_level(logging.DEBUG, logger=logger)
    for who in ("alice", "bob"):
        copy_into(models["llama"], tmp_path / who / "llama")
        copy_into(models["lora"], tmp_path / who / "lora")
    commit = build_hub_cache(tmp_path / "hub", "org/tiny", models["llama"])
    tenants = write_tenants(tmp_path / "tenants.toml", {
        who: {"key": KEYS[who], "roots": [str(tmp_path / who)]} for who in ("alice", "bob")})
    worker = pool.start("w1", env={"MODELQ_TENANTS_FILE": str(tenants),
                                   "HF_HUB_CACHE": str(tmp_path / "hub")})

    with gateway(settings, tenants) as http:
        alice, bob, anon = http["alice"], http["bob"], http["anon"]
        load = {"model": {"path": str(tmp_path / "alice" / "llama")}}

        # --- no key, a wrong key, an empty one: 401, and nothing is enqueued ---------------
        wrong = {"Authorization": f"Bearer {KEYS['alice']}x"}
        for response in (anon.post("/v1/jobs/load", json=load),
                         anon.post("/v1/jobs", json={"kind": "load", **load}),
                         anon.post("/v1/jobs/load", json=load, headers=wrong),
                         anon.post("/v1/jobs/load", json=load, headers={"X-API-Key": "nope"}),
                         anon.post("/v1/jobs/load", json=load, headers={"X-API-Key": ""}),
                         anon.get("/v1/workers"), anon.get("/v1/jobs/nope")):
            assert error_of(response, 401)["type"] == "AccessDenied"
            assert response.headers["www-authenticate"] == "Bearer"
        assert job_count(client, "alice", "bob", "default") == 0

        # --- alice's key: her job, signed with her key, runs on the worker ------------------
        job_id = submitted(alice.post("/v1/jobs/load", json=load), "alice")
        own = finished(alice, job_id)
        assert own["status"] == "succeeded", own["error"]
        model_key = own["result"]["model_key"]
        events = sse(alice, job_id)
        assert events[0]["event"] == "queued" and events[-1]["event"] == "succeeded"
        # X-API-Key works as well as a bearer token
        assert anon.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": KEYS["alice"]}).json() == own

        # --- bob sees no such job: the same 404 as for an id that never existed -------------
        unknown = "f" * 32
        for path in ("/v1/jobs/{}", "/v1/jobs/{}/events"):
            theirs = error_of(bob.get(path.format(job_id)), 404)
            never = error_of(bob.get(path.format(unknown)), 404)
            assert theirs == {**never, "message": never["message"].replace(unknown, job_id)}
            assert theirs["type"] == "JobNotFound"
        assert error_of(bob.post(f"/v1/jobs/{job_id}/cancel"), 404)["type"] == "JobNotFound"

        # --- bob can't unload or attach to alice's model, which looks to him as a model no
        # worker holds; it stays, and bob's view of the pool lacks it ------------------------
        nowhere = "e" * 32
        for kind, body in (("unload", {"model_key": model_key}),
                           ("attach", {"model_key": model_key,
                                       "adapter": str(tmp_path / "bob" / "lora")})):
            theirs = error_of(bob.post(f"/v1/jobs/{kind}", json=body), 404)
            never = error_of(bob.post(f"/v1/jobs/{kind}", json={**body, "model_key": nowhere}), 404)
            assert theirs == {**never, "message": never["message"].replace(nowhere, model_key)}
            assert theirs["type"] == "ModelNotFound"
        assert job_count(client, "bob") == 0
        assert model_key in model_keys(alice) and model_key not in model_keys(bob)
        assert finished(alice, job_id) == own  # bob's cancel changed nothing

        # --- alice can't act as bob: a body naming another tenant is refused ----------------
        refused = alice.post("/v1/jobs/load", json={**load, "tenant": "bob"})
        assert error_of(refused, 403)["type"] == "AccessDenied"
        assert error_of(alice.post("/v1/jobs", json={"kind": "unload", "model_key": model_key,
                                                     "tenant": "bob"}), 403)["type"] == "AccessDenied"
        assert job_count(client, "bob") == 0

        # --- paths outside alice's roots fail on the worker with AccessDenied ---------------
        for path in (tmp_path / "bob" / "llama", f"{tmp_path}/alice/../bob/llama"):
            outside = finished(alice, submitted(
                alice.post("/v1/jobs/load", json={"model": {"path": str(path)}}), "alice"))
            assert outside["status"] == "failed" and outside["error"]["type"] == "AccessDenied"
            assert "outside the tenant's roots" in outside["error"]["message"]

        # --- a pinned public base is shared; each tenant sees it with only its own adapter --
        shared_keys = set()
        for who, caller in (("alice", alice), ("bob", bob)):
            base = {"model": {"repo_id": "org/tiny", "revision": commit},
                    "adapters": [{"ref": str(tmp_path / who / "lora"), "name": f"{who}-lora"}]}
            record = finished(caller, submitted(caller.post("/v1/jobs/load", json=base), who))
            assert record["status"] == "succeeded", record["error"]
            shared_keys.add(record["result"]["model_key"])
        (shared,) = shared_keys
        pool.wait_registered(worker)
        assert model_keys(alice)[shared] == ["alice-lora"]
        assert model_keys(bob) == {shared: ["bob-lora"]}

        # --- alice's own cancel and unload work --------------------------------------------
        assert alice.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "succeeded"
        gone = finished(alice, submitted(alice.post("/v1/jobs/unload", json={"model_key": model_key}),
                                         "alice"))
        assert gone["status"] == "succeeded", gone["error"]
        assert model_key not in model_keys(alice)
        seen: list[str] = anon.seen  # type: ignore[attr-defined]

    # --- no key in any response, Redis value, gateway log or worker log --------------------
    assert worker.alive()
    worker.terminate()
    text = "\n".join(seen) + dump_redis(client.redis) + worker.log_text() + caplog.text
    assert "GWKEYMARKER" not in text
    assert len(seen) > 30
