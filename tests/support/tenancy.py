"""Helpers for multi-tenant tests: a tenants file, tenant clients, raw message sends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr

from schemas import JobKind, JobRecord, JobStatus
from schemas.jobs import AttachAdapterJob, Envelope, LoadJob, UnloadJob
from tasks.auth import sign
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.store import now


def write_tenants(path: Path, tenants: dict[str, dict[str, Any]]) -> Path:
    """A TOML tenants file (values as JSON literals, which TOML accepts for these types)."""
    lines = []
    for name, entry in tenants.items():
        lines.append(f"[tenants.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def copy_into(source: Path, folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, folder)
    return folder


def tenant_client(settings: Settings, tenant: str, key: str | None, **more: Any) -> Client:
    secret = None if key is None else SecretStr(key)
    return Client(settings.model_copy(update={"tenant": tenant, "tenant_key": secret, **more}))


def send_raw(client: Client, job: LoadJob | AttachAdapterJob | UnloadJob, queue: str, *,
             key: str | None = None, job_id: str | None = None,
             create: bool = True, payload: dict[str, Any] | None = None) -> str:
    """Write a record and send a message as a producer that skips the client's checks would."""
    import uuid

    job_id = job_id or uuid.uuid4().hex
    if create:
        client.store.create(JobRecord(job_id=job_id, kind=JobKind(job.kind), tenant=job.tenant,
                                      status=JobStatus.queued, created_at=now(), job=job))
    if payload is None:
        payload = Envelope(job_id=job_id, submitted_at=now(), job=job).model_dump(mode="json")
        if key is not None:
            payload = sign(payload, key, tenant=job.tenant, ttl_seconds=60)
    client.app.send_task("modelq.run", args=[payload], task_id=job_id, queue=queue)
    return job_id


def dump_redis(client: redis.Redis) -> str:
    """Every key and value in Redis as text, for secret searches."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(key)
        else:
            value = kind
        out.append(f"{key!r} {value!r}")
    return "\n".join(out)
