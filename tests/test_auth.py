"""Signing and verifying envelopes, and reading the tenants file (real Redis, no workers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import AccessDenied, LoadJob, ModelRef
from schemas.jobs import Envelope, decode_envelope
from tasks.auth import canonical, sign, verify
from tasks.settings import Settings
from tasks.state.connection import connect
from tasks.state.keys import Keys
from tasks.tenants import TenantsFileError, authenticate, load_tenants, parse_tenants

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef"
TENANTS = {"tenants": {"alice": {"key": ALICE_KEY, "roots": ["/data/alice"], "priority": 2},
                       "bob": {"key": BOB_KEY, "max_models": 1}}}


def envelope(tenant: str = "alice", job_id: str = "j1") -> dict[str, object]:
    job = LoadJob(model=ModelRef(path="/data/alice/m"), tenant=tenant)
    return Envelope(job_id=job_id, submitted_at=datetime.now(UTC),
                    job=job).model_dump(mode="json")


def test_signed_envelope_verifies_once_per_job_and_decodes(settings: Settings) -> None:
    tenants, redis, keys = parse_tenants(TENANTS), connect(settings), Keys()
    payload = sign(envelope(), ALICE_KEY, tenant="alice", ttl_seconds=60)
    assert decode_envelope(payload).auth is not None  # the contract carries the signature
    assert b" " not in canonical(payload) and ALICE_KEY not in str(payload)
    assert verify(payload, tenants, redis, keys) == "alice"
    assert verify(payload, tenants, redis, keys) == "alice"  # a redelivery of the same job passes
    ttl = redis.ttl(keys.nonce("alice", payload["auth"]["nonce"]))  # type: ignore[index]
    assert 0 < ttl <= 61


@pytest.mark.parametrize("case", ["unsigned", "wrong key", "tampered", "other tenant", "expired",
                                  "nonce reused", "unknown tenant"])
def test_bad_envelopes_are_access_denied(settings: Settings, case: str) -> None:
    tenants, redis, keys = parse_tenants(TENANTS), connect(settings), Keys()
    payload = sign(envelope(), ALICE_KEY, tenant="alice", ttl_seconds=60)
    if case == "unsigned":
        payload = envelope()
    elif case == "wrong key":
        payload = sign(envelope(), BOB_KEY, tenant="alice", ttl_seconds=60)
    elif case == "tampered":
        payload["job"]["model"]["path"] = "/data/bob/m"  # type: ignore[index]
    elif case == "other tenant":  # bob signs a job that names alice
        payload = sign(envelope(), BOB_KEY, tenant="bob", ttl_seconds=60)
    elif case == "expired":
        payload = sign(envelope(), ALICE_KEY, tenant="alice", ttl_seconds=60,
                       now=datetime.now(UTC) - timedelta(seconds=120))
    elif case == "nonce reused":
        verify(payload, tenants, redis, keys)
        redis.set(keys.nonce("alice", payload["auth"]["nonce"]), "another-job")  # type: ignore[index]
    elif case == "unknown tenant":
        payload = sign(envelope("mallory"), "mallory-key-0123456789", tenant="mallory",
                       ttl_seconds=60)
    with pytest.raises(AccessDenied) as info:
        verify(payload, tenants, redis, keys)
    assert ALICE_KEY not in info.value.message and BOB_KEY not in info.value.message


def test_expired_envelope_of_a_started_job_is_a_redelivery(settings: Settings) -> None:
    payload = sign(envelope(), ALICE_KEY, tenant="alice", ttl_seconds=60,
                   now=datetime.now(UTC) - timedelta(seconds=120))
    assert verify(payload, parse_tenants(TENANTS), connect(settings), Keys(), started=True) == "alice"


def test_tenants_file_and_gateway_hook(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(f'[tenants.alice]\nkey = "{ALICE_KEY}"\nroots = ["/data/alice"]\npriority = 2\n'
                    f'[tenants.bob]\nkey = "{BOB_KEY}"\nmax_models = 1\n'
                    'hub_token_env = "BOB_HF_TOKEN"\n')
    tenants = load_tenants(path)
    assert tenants.multi and sorted(tenants) == ["alice", "bob"]
    assert tenants["alice"].priority == 2 and tenants["bob"].limits().max_models == 1
    assert authenticate(BOB_KEY, tenants).name == "bob"
    with pytest.raises(AccessDenied):
        authenticate("not-a-key-at-all-000", tenants)
    assert not load_tenants(None).multi  # no file: single tenant 'default'
    with pytest.raises(AccessDenied):
        authenticate("anything", load_tenants(None))


@pytest.mark.parametrize("text", ['[tenants.alice]\nkey = "short"\n',
                                  '[tenants.Alice]\nkey = "0123456789abcdefXYZ"\n',
                                  '[tenants.a]\nkey = "0123456789abcdefXYZ"\nroots = ["rel"]\n',
                                  '[tenants.a]\nkey = "0123456789abcdefXYZ"\n'
                                  '[tenants.b]\nkey = "0123456789abcdefXYZ"\n',
                                  'not toml ['])
def test_bad_tenants_files_say_what_to_fix_without_the_key(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    with pytest.raises(TenantsFileError) as info:
        load_tenants(path)
    assert "0123456789abcdefXYZ" not in str(info.value) and "short" not in str(info.value)
