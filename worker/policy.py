"""Tenant rules on the worker, as one object handed to the job handlers (no Redis here).

`TenantPolicy` answers every tenant question a handler asks, for a single-tenant
worker (no tenants file: everything is tenant `default`, nothing is namespaced or
counted) and a multi-tenant one alike:

- `access(tenant)`: the job's roots, pickle rule and hub token (worker/access.py); a
  single-tenant worker's roots are MODELQ_ROOTS (`roots`), any path when unset;
- `check_job(job)`: the remote-code rule, before anything is resolved;
- `identity(base, job)`: a private model's key includes its tenant, so another tenant's
  identical load is a new model; a public hub repo at a pinned commit is shared;
- `adapter_name` / `view`: adapter names are namespaced as `NAME@TENANT` on a model
  ('@' is in no tenant or adapter name); records show a tenant only its own, plainly;
- `owned(entry, tenant)`: whether a resident model may be used by a job's tenant;
- `check_quota(...)`: the one place a worker checks max_models / max_resident_bytes.

Tokens are read when a job needs them and never logged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from schemas import LoadJob, ModelInfo
from schemas.errors import AccessDenied, ModelNotFound, QuotaExceeded, RemoteCodeNotAllowed
from schemas.tenants import SHARED_TENANT, Tenant
from tasks.tenants import Tenants
from worker.access import Access, real_roots, rooted
from worker.models.cache import Entry
from worker.models.resolve import Source

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")
AMBIENT_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


class TenantPolicy:
    """The tenants file's rules (or none, single-tenant) as the handlers apply them."""

    def __init__(self, tenants: Tenants, roots: tuple[str, ...] = ()) -> None:
        self.tenants = tenants
        self.multi = tenants.multi
        self._single = rooted(roots)  # single-tenant: MODELQ_ROOTS, or any path when unset

    # --- what a job may touch ----------------------------------------------------------

    def access(self, tenant: str) -> Access:
        """The roots, pickle rule and hub token for a job of `tenant` (AccessDenied: unknown)."""
        if not self.multi:
            return self._single
        rules = self.tenants.get_tenant(tenant)
        return Access(tenant=rules.name, roots=real_roots(rules.roots),
                      allow_pickle=rules.allow_pickle_weights, token=hub_token(rules))

    def check_job(self, job: LoadJob) -> None:
        """RemoteCodeNotAllowed when the job's tenant may not run a repo's own code."""
        if not self.multi or not job.trust_remote_code:
            return
        tenant = self.tenants.get_tenant(job.tenant)
        if not tenant.allow_remote_code:
            raise RemoteCodeNotAllowed(
                f"tenant {tenant.name!r} may not run a repo's own code (allow_remote_code is off "
                "in the tenants file): use a built-in architecture or ask the operator",
                tenant=tenant.name)

    # --- model identity and sharing ----------------------------------------------------

    def shares(self, job: LoadJob, base: Source) -> bool:
        """Whether `job`'s base is loaded once for every tenant: a public hub repo at a pinned
        commit, no custom code, fetched without a token."""
        if not self.multi:
            return False
        ref = job.model
        return (ref.repo_id is not None and base.repo_id == ref.repo_id
                and ref.revision is not None and _COMMIT.fullmatch(ref.revision) is not None
                and not job.trust_remote_code
                and hub_token(self.tenants.get_tenant(job.tenant)) is False)

    def identity(self, base: Source, job: LoadJob) -> str:
        """What a model key is built from: the base, and the tenant for a private model."""
        if not self.multi or self.shares(job, base):
            return base.identity
        return f"{base.identity}|tenant:{job.tenant}"

    def owner(self, job: LoadJob, base: Source) -> str:
        """The tenant a freshly loaded entry belongs to ('*' for a shared base)."""
        return SHARED_TENANT if self.shares(job, base) else job.tenant

    def adapter_name(self, name: str, tenant: str) -> str:
        """An adapter's name on the model: namespaced by tenant in a multi-tenant pool."""
        return f"{name}@{tenant}" if self.multi else name

    def tenant_adapters(self, entry: Entry, tenant: str) -> list[str]:
        """The names (on the model) of `tenant`'s adapters on `entry`."""
        if not self.multi:
            return list(entry.adapters)
        return [name for name in entry.adapters if name.endswith(f"@{tenant}")]

    def view(self, info: ModelInfo, entry: Entry, tenant: str) -> ModelInfo:
        """`info` as `tenant` may see it: only its own adapters, by their plain names."""
        if not self.multi:
            return info
        private = entry.tenant != SHARED_TENANT
        return info.model_copy(update={"adapters": visible(info.adapters, tenant, private),
                                       "active_adapters": visible(info.active_adapters, tenant,
                                                                  private)})

    def owned(self, entry: Entry | None, key: str, tenant: str, worker: str) -> Entry:
        """`entry` when `tenant` may use it; ModelNotFound (absent) or AccessDenied (another's)."""
        if entry is None or (not self.multi and entry.tenant != tenant):
            raise ModelNotFound(f"model {key} is not resident on worker {worker}: load it "
                                "first (`modelq ls` lists resident models)", model_key=key)
        if entry.tenant not in (tenant, SHARED_TENANT):
            raise AccessDenied(f"model {key} belongs to another tenant: load your own copy",
                               model_key=key, tenant=tenant)
        return entry

    # --- quotas ------------------------------------------------------------------------

    def check_quota(self, tenant: str, entries: Iterable[Entry], *, adding: int,
                    skip: str | None = None) -> None:
        """QuotaExceeded when one more model of `adding` bytes breaks `tenant`'s limits, counting
        the resident `entries` it owns or shares (less `skip`, the model being counted)."""
        if not self.multi:
            return
        rules = self.tenants.get_tenant(tenant)
        mine = [e for e in entries if e.key != skip and (e.tenant == tenant or tenant in e.shared_by)]
        models, used = len(mine), sum(e.bytes for e in mine)
        if rules.max_models is not None and models + 1 > rules.max_models:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {models} models resident on this worker and max_models "
                f"is {rules.max_models}: unload one (`modelq unload KEY`) first",
                quota="max_models", used=models, limit=rules.max_models)
        if rules.max_resident_bytes is not None and used + adding > rules.max_resident_bytes:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {used} bytes resident on this worker; this model adds "
                f"{adding} and max_resident_bytes is {rules.max_resident_bytes}: unload a model "
                "or load a smaller (quantized) one", quota="max_resident_bytes", used=used,
                adding=adding, limit=rules.max_resident_bytes)


def visible(names: tuple[str, ...], tenant: str, private: bool) -> tuple[str, ...]:
    """The adapter names `tenant` sees: its own, without the namespace."""
    suffix = f"@{tenant}"
    out = [n.removesuffix(suffix) for n in names if n.endswith(suffix)]
    return tuple(out + ([n for n in names if "@" not in n] if private else []))


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
