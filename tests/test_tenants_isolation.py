"""Tenants end to end, on one worker with a tenants file: identity, isolation, paths, policies,
worker-side quotas, a shared pinned base with two tenants' adapters, and no secret anywhere."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas import (
    AccessDenied,
    AdapterSpec,
    AttachAdapterJob,
    JobRecord,
    JobStatus,
    LoadJob,
    ModelRef,
    UnloadJob,
)
from schemas.jobs import Envelope
from tasks.auth import sign
from tasks.cli import render
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import worker_queue
from tasks.state.store import now
from tests.support.models import build_hub_cache, build_pickle_only_model, build_remote_code_model
from tests.support.tenancy import copy_into, dump_redis, send_raw, tenant_client, write_tenants
from tests.support.workers import WorkerPool, WorkerProcess

pytestmark = pytest.mark.e2e

KEYS = {t: f"KEYMARKER-{t}-0123456789abcdef" for t in ("alice", "bob", "carol", "dave")}
CAROL_TOKEN = "hf_TOKENMARKERcarol0123456789"
AMBIENT_TOKEN = "hf_TOKENMARKERambient0123456789"


def wait(client: Client, job_id: str) -> JobRecord:
    return client.job(job_id).wait(timeout=120)


def failed_with(record: JobRecord, error_type: str) -> str:
    assert record.status is JobStatus.failed, record
    assert record.error is not None and record.error.type == error_type, record.error
    return record.error.message


def wait_log(worker: WorkerProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in the worker log"
        time.sleep(0.1)


def test_tenants_end_to_end(client: Client, pool: WorkerPool, settings: Settings,
                            models: dict[str, Path], tmp_path: Path) -> None:
    alice_llama = copy_into(models["llama"], tmp_path / "alice" / "llama")
    copy_into(models["lora"], tmp_path / "alice" / "lora")
    copy_into(models["llama"], tmp_path / "bob" / "llama")
    copy_into(models["lora"], tmp_path / "bob" / "lora")
    copy_into(models["llama"], tmp_path / "dave" / "llama")
    copy_into(models["qwen2"], tmp_path / "dave" / "qwen2")
    (tmp_path / "alice" / "escape").symlink_to(models["llama"])
    build_remote_code_model(tmp_path / "alice" / "remote", tmp_path / "marker-alice")
    build_remote_code_model(tmp_path / "carol" / "remote", tmp_path / "marker-carol")
    build_pickle_only_model(tmp_path / "alice" / "pickled")
    build_pickle_only_model(tmp_path / "carol" / "pickled")
    commit = build_hub_cache(tmp_path / "hub", "org/tiny", models["llama"])
    tenants = write_tenants(tmp_path / "tenants.toml", {
        "alice": {"key": KEYS["alice"], "roots": [str(tmp_path / "alice")]},
        "bob": {"key": KEYS["bob"], "roots": [str(tmp_path / "bob")]},
        "carol": {"key": KEYS["carol"], "roots": [str(tmp_path / "carol")],
                  "allow_remote_code": True, "allow_pickle_weights": True,
                  "hub_token_env": "CAROL_TOKEN"},
        "dave": {"key": KEYS["dave"], "roots": [str(tmp_path / "dave")], "max_models": 1},
        "erin": {"key": "KEYMARKER-erin-0123456789abcdef", "max_resident_bytes": 1000,
                 "roots": [str(tmp_path / "dave")]},
    })
    worker = pool.start("w1", env={"MODELQ_TENANTS_FILE": str(tenants),
                                   "HF_HUB_CACHE": str(tmp_path / "hub"),
                                   "HF_TOKEN": AMBIENT_TOKEN, "CAROL_TOKEN": CAROL_TOKEN})
    alice, bob, carol, dave = (tenant_client(settings, t, KEYS[t])
                               for t in ("alice", "bob", "carol", "dave"))

    # --- identity: signed jobs run; unsigned, wrongly signed, expired ones are refused ----
    own = alice.submit(LoadJob(model=ModelRef(path=str(alice_llama)))).wait(timeout=120)
    assert own.status is JobStatus.succeeded and own.tenant == "alice", own.error
    assert own.result is not None
    alice_key = own.result.model_key
    unsigned = tenant_client(settings, "alice", None).submit(LoadJob(model=str(alice_llama)))
    assert "not signed" in failed_with(unsigned.wait(timeout=120), "AccessDenied")
    wrong = tenant_client(settings, "alice", KEYS["bob"]).submit(LoadJob(model=str(alice_llama)))
    assert "signature" in failed_with(wrong.wait(timeout=120), "AccessDenied")

    class PastClient(Client):
        def _signed(self, envelope: Envelope) -> dict[str, Any]:
            return sign(envelope.model_dump(mode="json"), KEYS["alice"], tenant="alice",
                        ttl_seconds=60, now=datetime.now(UTC) - timedelta(hours=1))

    expired = PastClient(alice.settings).submit(LoadJob(model=str(alice_llama)))
    assert "expired" in failed_with(expired.wait(timeout=120), "AccessDenied")

    # a replayed message of a finished job is refused; the record does not change
    job = LoadJob(model=str(alice_llama), tenant="alice")
    payload = sign(Envelope(job_id="a" * 32, submitted_at=now(), job=job).model_dump(mode="json"),
                   KEYS["alice"], tenant="alice", ttl_seconds=60)
    first = wait(client, send_raw(client, job, "modelq", job_id="a" * 32, payload=payload))
    assert first.status is JobStatus.succeeded
    send_raw(client, job, "modelq", job_id="a" * 32, payload=payload, create=False)
    wait_log(worker, f"job {'a' * 32}: refused")
    assert client.status("a" * 32) == first

    # forged messages never touch a record they don't own: bob naming alice's queued job,
    # and alice's own signed message changed after signing
    victim = "b" * 32
    client.store.create(JobRecord(job_id=victim, kind="load", tenant="alice",
                                  status=JobStatus.queued, created_at=now(), job=job))
    forged = LoadJob(model=str(tmp_path / "bob" / "llama"), tenant="bob")
    send_raw(client, forged, "modelq", key=KEYS["bob"], job_id=victim, create=False)
    wait_log(worker, f"job {victim}: refused")
    tampered = sign(Envelope(job_id="c" * 32, submitted_at=now(), job=job).model_dump(mode="json"),
                    KEYS["alice"], tenant="alice", ttl_seconds=60)
    tampered["job"]["model"]["path"] = str(tmp_path / "bob" / "llama")
    send_raw(client, job, "modelq", job_id="c" * 32, payload=tampered)
    wait_log(worker, f"job {'c' * 32}: refused")
    assert client.status(victim).status is JobStatus.queued
    assert client.status("c" * 32).status is JobStatus.queued

    # --- isolation: bob can't read, follow, cancel, attach to or unload alice's ----------
    for attempt in (lambda: bob.status(own.job_id), lambda: list(bob.job(own.job_id).events()),
                    lambda: bob.cancel(own.job_id),
                    lambda: bob.submit(AttachAdapterJob(model_key=alice_key,
                                                        adapter=str(tmp_path / "bob" / "lora"))),
                    lambda: bob.submit(UnloadJob(model_key=alice_key))):
        with pytest.raises(AccessDenied):
            attempt()
    assert all(m.model_key != alice_key for w in bob.workers() for m in w.models)
    # the worker checks too, for producers that skip the client
    sneaky = [send_raw(client, AttachAdapterJob(model_key=alice_key, tenant="bob",
                                                adapter=str(tmp_path / "bob" / "lora")),
                       worker_queue("w1"), key=KEYS["bob"]),
              send_raw(client, UnloadJob(model_key=alice_key, tenant="bob"), worker_queue("w1"),
                       key=KEYS["bob"])]
    for job_id in sneaky:
        assert "another tenant" in failed_with(wait(client, job_id), "AccessDenied")
    assert any(m.model_key == alice_key for w in alice.workers() for m in w.models)

    # --- paths: '..', absolute elsewhere, a symlink that escapes ------------------------
    for ref in (f"{tmp_path}/alice/../bob/llama", str(models["llama"]),
                str(tmp_path / "alice" / "escape")):
        record = alice.submit(LoadJob(model=ref)).wait(timeout=120)
        assert "outside the tenant's roots" in failed_with(record, "AccessDenied")

    # --- remote code: only where the tenant's policy allows it --------------------------
    refused = alice.submit(LoadJob(model=str(tmp_path / "alice" / "remote"),
                                   trust_remote_code=True)).wait(timeout=120)
    failed_with(refused, "RemoteCodeNotAllowed")
    assert not (tmp_path / "marker-alice").exists()
    allowed = carol.submit(LoadJob(model=str(tmp_path / "carol" / "remote"),
                                   trust_remote_code=True)).wait(timeout=120)
    assert allowed.status is JobStatus.succeeded, allowed.error
    assert (tmp_path / "marker-carol").exists()

    # --- pickle weights: only where the tenant's policy allows them ---------------------
    failed_with(alice.submit(LoadJob(model=str(tmp_path / "alice" / "pickled"))).wait(timeout=120),
                "UnsafeWeights")
    pickled = carol.submit(LoadJob(model=str(tmp_path / "carol" / "pickled"))).wait(timeout=120)
    assert pickled.status is JobStatus.succeeded, pickled.error

    # --- quotas on the worker: models and resident bytes --------------------------------
    assert dave.submit(LoadJob(model=str(tmp_path / "dave" / "llama"))).wait(
        timeout=120).status is JobStatus.succeeded
    over = dave.submit(LoadJob(model=str(tmp_path / "dave" / "qwen2"))).wait(timeout=120)
    assert "max_models is 1" in failed_with(over, "QuotaExceeded")
    erin = tenant_client(settings, "erin", "KEYMARKER-erin-0123456789abcdef")
    big = erin.submit(LoadJob(model=str(tmp_path / "dave" / "llama"))).wait(timeout=120)
    assert "max_resident_bytes is 1000" in failed_with(big, "QuotaExceeded")
    assert big.error is not None and big.error.details["quota"] == "max_resident_bytes"

    # --- a public base at a pinned commit is shared, each tenant with its own adapter ---
    tiny = ModelRef(repo_id="org/tiny", revision=commit)
    mine = alice.submit(LoadJob(model=tiny, adapters=(AdapterSpec(
        ref=str(tmp_path / "alice" / "lora")),))).wait(timeout=120)
    theirs = bob.submit(LoadJob(model=tiny, adapters=(AdapterSpec(
        ref=str(tmp_path / "bob" / "lora")),))).wait(timeout=120)
    assert mine.result is not None and theirs.result is not None, (mine.error, theirs.error)
    assert theirs.result.model_key == mine.result.model_key and theirs.result.cache_hit
    assert mine.result.adapters == theirs.result.adapters == ("default",)
    tokened = carol.submit(LoadJob(model=tiny)).wait(timeout=120)  # carol has a token: private
    assert tokened.result is not None and tokened.result.model_key != mine.result.model_key
    pool.wait_registered(worker)
    shared = _resident(client, mine.result.model_key)
    assert shared.tenant == "*" and shared.shared_by == ("alice", "bob")
    assert set(shared.adapters) == {"default@alice", "default@bob"}
    assert "shared bases save" in str(render.workers_table(client.workers()).caption)
    gone = bob.submit(UnloadJob(model_key=mine.result.model_key)).wait(timeout=120)
    assert gone.status is JobStatus.succeeded, gone.error
    _wait_until(lambda: _resident(client, mine.result.model_key).shared_by == ("alice",))
    assert _resident(client, mine.result.model_key).adapters == ("default@alice",)

    # --- no key or token in any Redis value or log line ---------------------------------
    assert worker.alive()
    worker.terminate()
    text = dump_redis(client.redis) + worker.log_text()
    for secret in (*KEYS.values(), CAROL_TOKEN, AMBIENT_TOKEN, "KEYMARKER", "TOKENMARKER"):
        assert secret not in text
    assert "tenant shares of them by turns" in worker.log_text()  # tasks/state/turns.py


def _resident(client: Client, key: str) -> Any:
    return next(m for w in client.workers() for m in w.models if m.model_key == key)


def _wait_until(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.1)
