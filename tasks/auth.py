"""Signing job envelopes with a tenant's key, and verifying them on the worker (no torch).

A producer signs the envelope it sends: HMAC-SHA256, keyed with its tenant key, over
the canonical JSON (sorted keys, no spaces, UTF-8) of the whole envelope with
`auth.signature` left out, so the tenant, the nonce and the expiry are signed too.
The worker checks, before it resolves anything: the tenant exists and matches the
job's tenant, the signature, the expiry, and that the nonce was not used for another
delivery (nonces live in Redis until the envelope expires).

Redelivery is not replay: a nonce already bound to the same job id passes here, and
the runner's record checks make a second delivery of one job do nothing twice.
An expired envelope is refused only before its job first started, so a job whose
worker died is still redelivered after the signature's lifetime.

Nothing here ever puts a key or a signature into a message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from schemas.errors import AccessDenied
from schemas.tenants import Signature
from tasks.state.connection import text
from tasks.state.keys import Keys
from tasks.tenants import Tenants


def canonical(envelope: dict[str, Any]) -> bytes:
    """The bytes that are signed: the envelope without `auth.signature`, as canonical JSON."""
    body = dict(envelope)
    auth = body.get("auth")
    if isinstance(auth, dict):
        body["auth"] = {k: v for k, v in auth.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(envelope: dict[str, Any], key: str) -> str:
    return hmac.new(key.encode(), canonical(envelope), hashlib.sha256).hexdigest()


def sign(envelope: dict[str, Any], key: str, *, tenant: str, ttl_seconds: int,
         now: datetime | None = None) -> dict[str, Any]:
    """`envelope` (a JSON dict) with an `auth` block signed by `key` for `tenant`."""
    expires = (now or datetime.now(UTC)) + timedelta(seconds=ttl_seconds)
    unsigned = {**envelope, "auth": {"tenant": tenant, "nonce": secrets.token_hex(16),
                                     "expires_at": expires.isoformat().replace("+00:00", "Z")}}
    unsigned["auth"]["signature"] = digest(unsigned, key)
    return unsigned


def verify(payload: Any, tenants: Tenants, client: redis.Redis, keys: Keys, *,
           started: bool = False, now: datetime | None = None) -> str:
    """The tenant that signed `payload`; AccessDenied for unsigned, forged, expired, replayed.

    `started`: the job's record shows it already ran (a redelivery), so expiry is not held
    against it. Call with the raw message, before anything is resolved or loaded.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("auth"), dict):
        raise AccessDenied("the job is not signed: set MODELQ_TENANT and MODELQ_TENANT_KEY (the "
                           "key from your tenant's entry in the tenants file) and submit again")
    try:
        auth = Signature.model_validate(payload["auth"])
    except ValueError:
        raise AccessDenied("the job's signature block is malformed: submit it through the modelq "
                           "client, which signs it") from None
    job = payload.get("job")
    claimed = job.get("tenant", "default") if isinstance(job, dict) else None
    if claimed != auth.tenant:
        raise AccessDenied(f"the job names tenant {claimed!r} but was signed by {auth.tenant!r}: "
                           "a tenant submits jobs for itself only", tenant=auth.tenant)
    tenant = tenants.get_tenant(auth.tenant)
    if not hmac.compare_digest(digest(payload, tenant.key), auth.signature):
        raise AccessDenied(f"the job's signature does not match tenant {auth.tenant!r}'s key (or "
                           "the job was changed after signing): check MODELQ_TENANT_KEY",
                           tenant=auth.tenant)
    moment = now or datetime.now(UTC)
    left = (auth.expires_at - moment).total_seconds()
    if left <= 0 and not started:
        raise AccessDenied(f"the job's signature expired at {auth.expires_at.isoformat()} before a "
                           "worker took it: submit it again (or raise MODELQ_SIGNATURE_TTL_SECONDS)",
                           tenant=auth.tenant)
    job_id = str(payload.get("job_id"))
    key = keys.nonce(auth.tenant, auth.nonce)
    if not client.set(key, job_id, nx=True, ex=max(1, int(left) + 1)):
        used_for = client.get(key)
        if used_for is not None and text(used_for) != job_id:
            raise AccessDenied("the job's nonce was already used by another job: this is a "
                               "replayed message; submit a new job instead", tenant=auth.tenant)
    return auth.tenant
