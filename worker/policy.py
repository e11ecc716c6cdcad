"""A tenant's rules on the worker: who sent a job, which folders and token it may use, its quotas.

- `Gate` admits a job message before anything is resolved: signature, expiry, replay
  (tasks/auth.py), and decides whether a refused message may fail the record it names.
- `scope(tenant)` makes a tenant's roots and token the current ones while its job runs;
  `guard_path` (called by worker/resolve.py for every local folder, before anything in it
  is read) refuses folders whose real path is outside the tenant's roots.
- `hub_token`, `check_quota` and `is_shareable` answer the tenant questions of worker/tenancy.py.

Rule for refused messages: a message that fails verification may mark the record it
names failed/AccessDenied only if that record is still `queued`, belongs to the tenant
the message names, and holds exactly the job and submit time the message carries (so it
is the message the record's own submit sent, e.g. with a wrong or missing key).
Otherwise (a forged message naming someone else's job id, a replay of a finished job)
nothing is written; the refusal is logged without keys or signatures. A correctly signed
message is still refused, without a write, when the record it names belongs to another
tenant or holds another job: a tenant's key moves only that tenant's records.

No secrets leave here: tokens are read when a job needs them and never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import ErrorInfo, JobStatus, LoadJob
from schemas.errors import AccessDenied, JobNotFound, QuotaExceeded
from schemas.jobs import Envelope
from schemas.tenants import Tenant
from tasks.auth import verify
from tasks.store import Store
from tasks.tenants import Tenants

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")
AMBIENT_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


@dataclass(frozen=True)
class Scope:
    """The tenant whose job is running, in a multi-tenant pool."""

    tenant: Tenant

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(Path(os.path.realpath(os.path.expanduser(r))) for r in self.tenant.roots)


_current: ContextVar[Scope | None] = ContextVar("modelq_tenant_scope", default=None)


@contextlib.contextmanager
def scope(tenant: Tenant) -> Iterator[Scope]:
    """Make `tenant`'s roots and token the current ones for the job that runs inside."""
    token = _current.set(Scope(tenant))
    try:
        yield _current.get()  # type: ignore[misc]
    finally:
        _current.reset(token)


def current() -> Scope | None:
    return _current.get()


def pickle_allowed() -> bool:
    """Whether the running job's tenant may load pickle checkpoints (allow_pickle_weights)."""
    active = current()
    return active is not None and active.tenant.allow_pickle_weights


def guard_path(given: str, real: Path) -> None:
    """AccessDenied unless `real` (a realpath) lies under one of the current tenant's roots."""
    active = current()
    if active is None:
        return
    for root in active.roots:
        if real == root or real.is_relative_to(root):
            return
    raise AccessDenied(f"tenant {active.tenant.name!r} may not load from {given}: it resolves "
                       "outside the tenant's roots; put the model under one of them (ask the "
                       "operator for the roots in the tenants file)", tenant=active.tenant.name)


def hub_token(tenant: Tenant) -> str | bool:
    """The tenant's hub token, read now from its env var or file; False (send none) without one."""
    value: str | None = None
    if tenant.hub_token_env:
        value = os.environ.get(tenant.hub_token_env)
    elif tenant.hub_token_file:
        try:
            value = Path(tenant.hub_token_file).expanduser().read_text().strip()
        except OSError:
            log.warning("tenant %s: hub token file cannot be read; going without a token",
                        tenant.name)
    return value or False


def drop_ambient_token() -> None:
    """A multi-tenant worker holds no token of its own: every hub call uses the job's tenant's."""
    for name in AMBIENT_TOKEN_VARS:
        os.environ.pop(name, None)
    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"


def is_shareable(job: LoadJob, tenant: Tenant) -> bool:
    """Whether `job`'s base may be shared: a public hub repo at a pinned commit, no custom code."""
    ref = job.model
    return (ref.repo_id is not None and ref.revision is not None
            and _COMMIT.fullmatch(ref.revision) is not None
            and not job.trust_remote_code and hub_token(tenant) is False)


def check_quota(tenant: Tenant, *, models: int, resident_bytes: int, adding_bytes: int) -> None:
    """QuotaExceeded when one more model of `adding_bytes` would break the tenant's limits."""
    if tenant.max_models is not None and models + 1 > tenant.max_models:
        raise QuotaExceeded(
            f"tenant {tenant.name!r} has {models} models resident on this worker and max_models "
            f"is {tenant.max_models}: unload one (`modelq unload KEY`) first",
            quota="max_models", used=models, limit=tenant.max_models)
    if tenant.max_resident_bytes is not None and \
            resident_bytes + adding_bytes > tenant.max_resident_bytes:
        raise QuotaExceeded(
            f"tenant {tenant.name!r} has {resident_bytes} bytes resident on this worker; this "
            f"model adds {adding_bytes} and max_resident_bytes is {tenant.max_resident_bytes}: "
            "unload a model or load a smaller (quantized) one",
            quota="max_resident_bytes", used=resident_bytes, adding=adding_bytes,
            limit=tenant.max_resident_bytes)


class Gate:
    """Admits job messages from the tenants of `tenants`; refuses the rest as AccessDenied."""

    def __init__(self, tenants: Tenants, store: Store) -> None:
        self.tenants = tenants
        self.store = store

    def admit(self, payload: Any, envelope: Envelope | None) -> bool:
        """True when the job may run; False when it was refused (recorded where the rule allows).

        `envelope` is None for a message that did not decode: True then only when it is
        signed by the tenant that owns the record it names (which it may then fail).
        """
        job_id = envelope.job_id if envelope is not None else str(payload.get("job_id"))
        try:
            record = self.store.get(job_id)
        except JobNotFound:
            record = None
        started = record is not None and record.attempt > 0
        try:
            tenant = verify(payload, self.tenants, self.store.redis, self.store.keys,
                            started=started)
        except AccessDenied as exc:
            log.warning("job %s: refused: %s", job_id, exc.message)
            if envelope is not None and record is not None \
                    and record.status is JobStatus.queued \
                    and record.tenant == envelope.job.tenant and record.job == envelope.job \
                    and record.created_at == envelope.submitted_at:
                error = ErrorInfo(type=exc.type, message=exc.message, retryable=False,
                                  details={k: str(v) for k, v in exc.details.items()})
                self.store.transition(job_id, JobStatus.failed, error=error, message=exc.message,
                                      only_from=frozenset({JobStatus.queued}))
            return False
        if envelope is None:
            return record is not None and record.tenant == tenant
        if record is not None and (record.tenant != tenant or record.job != envelope.job):
            log.warning("job %s: refused: the message names a job of another tenant or another "
                        "job than its record holds", job_id)
            return False
        if record is not None and record.terminal:
            log.warning("job %s: refused: the job already ended (a replayed or late message)",
                        job_id)
            return False
        return True
