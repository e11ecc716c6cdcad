"""Tenant contracts: a tenant's limits and policies, and a job envelope's signature (no torch).

`Tenant` is one entry of the tenants file (MODELQ_TENANTS_FILE, read in
tasks/tenants.py); `TenantLimits` is the part of it that is not secret, which
workers publish in Redis so producers can check quotas and pick queues without
the file. `Signature` travels inside the job envelope (schemas/jobs.py).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, field_validator, model_validator

from schemas.base import Contract

DEFAULT_TENANT = "default"
"""The tenant of every job in single-tenant mode, and of a job that names none."""

SHARED_TENANT = "*"
"""The tenant of a resident base that several tenants share (a public repo at a pinned commit)."""


class TenantLimits(Contract):
    """Quotas, policies and scheduling weight of one tenant (nothing secret here)."""

    max_resident_bytes: int | None = Field(default=None, ge=0)
    """Bytes of models the tenant may keep resident on one worker (None: no limit)."""

    max_models: int | None = Field(default=None, ge=0)
    """Models the tenant may keep resident on one worker."""

    max_concurrent_jobs: int | None = Field(default=None, ge=0)
    """Unfinished jobs (queued, retrying or running) the tenant may have at once."""

    max_queued_jobs: int | None = Field(default=None, ge=0)
    """Jobs the tenant may have waiting (queued or retrying) at once."""

    allow_remote_code: bool = False
    """Whether jobs may set trust_remote_code (hub repos still need a pinned commit)."""

    allow_pickle_weights: bool = False
    """Whether pickle checkpoints (.bin) may be loaded when no safetensors exist."""

    priority: int = Field(default=1, ge=1, le=16)
    """Scheduling weight: a tenant with priority 3 gets 3 turns for another's 1."""


class Tenant(TenantLimits):
    """One tenant of the tenants file: its secret key, its folders, its hub token source."""

    name: str
    key: str = Field(min_length=16, repr=False)
    """Shared secret the tenant signs its jobs with (and its gateway API key)."""

    roots: tuple[str, ...] = ()
    """Local folders the tenant may load from; no local path at all when empty."""

    hub_token_env: str | None = None
    """Environment variable on the worker that holds the tenant's hub token."""

    hub_token_file: str | None = None
    """File on the worker that holds the tenant's hub token."""

    @field_validator("roots")
    @classmethod
    def _absolute(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        for root in roots:
            if not root.startswith(("/", "~")):
                raise ValueError(f"root {root!r} must be an absolute folder")
        return roots

    @model_validator(mode="after")
    def _one_token_source(self) -> Tenant:
        if self.hub_token_env and self.hub_token_file:
            raise ValueError("give at most one of hub_token_env or hub_token_file")
        return self

    def limits(self) -> TenantLimits:
        return TenantLimits.model_validate(self.model_dump(include=set(TenantLimits.model_fields)))


class Signature(Contract):
    """Who sent a job envelope, until when it is valid, and the HMAC-SHA256 proving it.

    `signature` is the hex HMAC, with the tenant's key, of the canonical JSON (sorted
    keys, no spaces) of the whole envelope with this object's `signature` left out.
    """

    tenant: str
    nonce: str = Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")
    expires_at: datetime
    signature: str = Field(pattern=r"^[0-9a-f]{64}$")
