"""The tenants file (MODELQ_TENANTS_FILE, TOML) and who a key belongs to (no torch).

Read by workers (verify, roots, quotas, hub tokens) and the gateway (API keys).
Producers never need the file: workers publish each tenant's non-secret limits in
Redis (`publish_limits`), where the client reads quotas and queue weights.

    [tenants.alice]
    key = "a-long-random-secret"          # signs alice's jobs; her gateway API key
    roots = ["/data/alice"]               # local folders alice may load from
    max_resident_bytes = 8_000_000_000
    max_models = 4
    max_concurrent_jobs = 8
    max_queued_jobs = 100
    allow_remote_code = false
    allow_pickle_weights = false
    priority = 2
    hub_token_env = "ALICE_HF_TOKEN"      # or hub_token_file = "/run/secrets/alice-hf"

Without a file modelq is single-tenant: everyone is tenant `default`, jobs are not
signed, and policies are what they were before tenants existed.
"""

from __future__ import annotations

import base64
import hmac
import json
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import redis
from pydantic import ValidationError

from schemas import TERMINAL, JobStatus, WorkerInfo
from schemas.errors import AccessDenied, QuotaExceeded
from schemas.jobs import check_tenant, describe
from schemas.tenants import Tenant, TenantLimits
from tasks.state.connection import text
from tasks.state.keys import SHARED_QUEUE, Keys, queue_list, tenant_queues

DEFAULT_TENANT = "default"


class TenantsFileError(ValueError):
    """The tenants file is missing or does not validate; the message says where."""


class Tenants(Mapping[str, Tenant]):
    """The tenants by name; `multi` is False in single-tenant mode (no file)."""

    def __init__(self, tenants: dict[str, Tenant], *, multi: bool) -> None:
        self._tenants = tenants
        self.multi = multi

    def __getitem__(self, name: str) -> Tenant:
        return self._tenants[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tenants)

    def __len__(self) -> int:
        return len(self._tenants)

    def get_tenant(self, name: str) -> Tenant:
        """The tenant `name`; AccessDenied when the file names no such tenant."""
        tenant = self._tenants.get(name)
        if tenant is None:
            raise AccessDenied(f"tenant {name!r} is not in the tenants file: ask the operator to "
                               "add it, or set MODELQ_TENANT to your tenant", tenant=name)
        return tenant

    def authenticate(self, api_key: str) -> Tenant:
        """The tenant whose key is `api_key` (compared in constant time); AccessDenied if none."""
        found: Tenant | None = None
        for tenant in self._tenants.values():
            if hmac.compare_digest(tenant.key.encode(), api_key.encode()):
                found = tenant
        if found is None or not self.multi:
            raise AccessDenied("the API key matches no tenant: use the key from your tenant's "
                               "entry in the tenants file")
        return found


def single_tenant() -> Tenants:
    """Single-tenant mode: tenant `default`, remote code up to the job, no roots enforced."""
    default = Tenant(name=DEFAULT_TENANT, key="-" * 16, allow_remote_code=True)
    return Tenants({DEFAULT_TENANT: default}, multi=False)


def load_tenants(path: Path | str | None) -> Tenants:
    """The tenants of the TOML file at `path`; single-tenant mode when `path` is None."""
    if path is None:
        return single_tenant()
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise TenantsFileError(f"tenants file {path} cannot be read ({exc.strerror}): fix "
                               "MODELQ_TENANTS_FILE or unset it for single-tenant mode") from None
    except tomllib.TOMLDecodeError as exc:
        raise TenantsFileError(f"tenants file {path} is not valid TOML: {exc}") from None
    return parse_tenants(data, where=str(path))


def parse_tenants(data: Mapping[str, Any], where: str = "tenants file") -> Tenants:
    section = data.get("tenants")
    if not isinstance(section, dict) or not section:
        raise TenantsFileError(f"{where} has no [tenants.NAME] tables: add one per tenant")
    tenants: dict[str, Tenant] = {}
    keys: set[str] = set()
    for name, entry in section.items():
        try:
            check_tenant(name)
            tenant = Tenant.model_validate({**entry, "name": name})
        except (ValueError, TypeError) as exc:
            # never echo the entry: it holds the key
            detail = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            raise TenantsFileError(f"{where}: tenant {name!r}: {_no_input(detail)}") from None
        if tenant.key in keys:
            raise TenantsFileError(f"{where}: tenant {name!r} reuses another tenant's key: give "
                                   "each tenant its own")
        keys.add(tenant.key)
        tenants[name] = tenant
    return Tenants(tenants, multi=True)


def authenticate(api_key: str, tenants: Tenants) -> Tenant:
    """The gateway's hook: the tenant an API key belongs to, or AccessDenied."""
    return tenants.authenticate(api_key)


def publish_limits(client: redis.Redis, keys: Keys, tenants: Tenants) -> None:
    """Write every tenant's non-secret limits, for producers' quota checks and queue choice."""
    if not tenants.multi:
        return
    pipe = client.pipeline(transaction=False)
    for name, tenant in tenants.items():
        pipe.set(keys.tenant_limits(name), tenant.limits().model_dump_json())
    pipe.execute()


def share_waiting(client: redis.Redis, tenants: Tenants, base: str = SHARED_QUEUE) -> int:
    """Move the jobs waiting in queue `base` into their tenants' shares of it; how many moved.

    A producer that finds no published limits (no worker with a tenants file has run yet)
    sends every job to the one shared queue, first come first served: a worker calls this
    at start, before it consumes, so that work queued while no worker was up gets the same
    fair turns as work queued later (its turns sweep, tasks/state/turns.py, then finds them).
    Oldest first, each message keeps its place in its tenant's share; messages of no known
    tenant (or not readable) stay where they were. A worker that dies between taking a
    message and putting it in a share loses it: the lost job sweep (worker/recovery/rescue.py
    `Resend`) sends it again.
    """
    if not tenants.multi:
        return 0
    kept: list[bytes] = []
    moved = 0
    for _ in range(client.llen(queue_list(base))):
        raw = cast(bytes | None, client.rpop(queue_list(base)))  # kombu takes from the right
        if raw is None:
            break
        target = _share_of(raw, tenants, base)
        if target is None:
            kept.append(raw)
            continue
        queue, message = target
        client.lpush(queue_list(queue), message)
        moved += 1
    if kept:  # back where they were taken from, the oldest taken first again
        client.rpush(queue_list(base), *reversed(kept))
    return moved


def _share_of(raw: bytes, tenants: Tenants, base: str) -> tuple[str, str] | None:
    """(the tenant share a kombu message belongs in, the message routed there), or None."""
    try:
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))  # Celery protocol 2: [args, ...]
        payload = body[0][0]
        tenant = tenants[str(payload["job"].get("tenant", DEFAULT_TENANT))]
        queue = pick_queue(tenant.name, tenant.limits(), str(payload["job_id"]), base=base)
        message["properties"]["delivery_info"].update(exchange=queue, routing_key=queue)
    except (ValueError, LookupError, TypeError, AttributeError):
        return None
    return queue, json.dumps(message)


def read_limits(client: redis.Redis, keys: Keys, tenant: str) -> TenantLimits | None:
    """The published limits of `tenant`; None when workers run single-tenant."""
    return parse_limits(client.get(keys.tenant_limits(tenant)))


def parse_limits(raw: bytes | str | None) -> TenantLimits | None:
    """Limits as read from `Keys.tenant_limits` (None: no tenants file on the workers)."""
    return None if raw is None else TenantLimits.model_validate_json(raw)


def _no_input(detail: str) -> str:
    return detail.split(" [type=")[0]


def pick_queue(tenant: str, limits: TenantLimits, job_id: str, base: str = SHARED_QUEUE) -> str:
    """The tenant's queue within `base` (the prefix's shared queue or the chosen worker's),
    spread by job id over its weighted queues."""
    queues = tenant_queues(tenant, limits.priority, base)
    return queues[int(job_id[:8], 16) % len(queues)]


def check_submit_quota(client: redis.Redis, keys: Keys, tenant: str,
                       limits: TenantLimits) -> None:
    """QuotaExceeded when one more job would break max_queued_jobs or max_concurrent_jobs.

    Counts the tenant's open jobs (their ids are kept in `keys.open_jobs`; finished ones are
    pruned here). Producers submitting at the same instant may overshoot by a job or two.
    """
    if limits.max_queued_jobs is None and limits.max_concurrent_jobs is None:
        return
    ids = [text(i) for i in cast(list[bytes], client.zrange(keys.open_jobs(tenant), 0, -1))]
    raws = client.mget([keys.job(i) for i in ids]) if ids else []
    statuses = {i: json.loads(raw)["status"] for i, raw in zip(ids, raws, strict=True) if raw is not None}
    done = [i for i in ids if statuses.get(i) in (None, *(s.value for s in TERMINAL))]
    if done:
        client.zrem(keys.open_jobs(tenant), *done)
    unfinished = len(ids) - len(done)
    queued = sum(1 for s in statuses.values() if s in (JobStatus.queued.value,
                                                        JobStatus.retrying.value))
    if limits.max_queued_jobs is not None and queued + 1 > limits.max_queued_jobs:
        raise QuotaExceeded(f"tenant {tenant!r} has {queued} jobs queued and max_queued_jobs is "
                            f"{limits.max_queued_jobs}: wait for some to start, or cancel some",
                            quota="max_queued_jobs", used=queued, limit=limits.max_queued_jobs)
    if limits.max_concurrent_jobs is not None and unfinished + 1 > limits.max_concurrent_jobs:
        raise QuotaExceeded(f"tenant {tenant!r} has {unfinished} unfinished jobs and "
                            f"max_concurrent_jobs is {limits.max_concurrent_jobs}: wait for some "
                            "to finish, or cancel some", quota="max_concurrent_jobs",
                            used=unfinished, limit=limits.max_concurrent_jobs)


def visible_workers(workers: list[WorkerInfo], tenant: str) -> list[WorkerInfo]:
    """The pool as `tenant` may see it: its own models and shared bases, its own adapters."""
    out = []
    for worker in workers:
        models = []
        for model in worker.models:
            if model.tenant not in (tenant, "*"):  # '*': a shared base, public by definition
                continue
            mine = model.tenant == tenant
            models.append(model.model_copy(update={
                "adapters": _own_adapters(model.adapters, tenant, mine),
                "active_adapters": _own_adapters(model.active_adapters, tenant, mine)}))
        out.append(worker.model_copy(update={"models": tuple(models)}))
    return out


def _own_adapters(names: tuple[str, ...], tenant: str, own_model: bool) -> tuple[str, ...]:
    """The adapter names `tenant` sees: its own ('NAME@tenant', shown as NAME), and on its own
    model the names without a tenant suffix."""
    suffix = f"@{tenant}"
    return tuple(n.removesuffix(suffix) for n in names
                 if n.endswith(suffix) or (own_model and "@" not in n))
