"""One typed settings object (prefix MODELQ_), built once at start and passed in (no torch)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """Redis as Redis Sentinel names it: the sentinels to ask, the master's name, db and AUTH.

    `username`/`password` are the master's (as in kombu); the sentinels' own password,
    if they have one, is `Settings.sentinel_password`.
    """

    nodes: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    def broker_url(self) -> str:
        """The URL for Celery: kombu reads db and AUTH from the first sentinel only, so put them there."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        first, *rest = (f"{SENTINEL_SCHEME}://{host}:{port}" for host, port in self.nodes)
        first = first.replace("://", f"://{auth}", 1) + f"/{self.db}"
        return ";".join([first, *rest])


def parse_sentinel_url(url: str, master: str) -> SentinelTarget:
    """`sentinel://[[user]:password@]host[:port][/db]` joined by `;` (Celery's form); ValueError if not."""
    nodes: list[tuple[str, int]] = []
    dbs: set[int] = set()
    username = password = None
    for part in filter(None, (p.strip() for p in url.split(";"))):
        parsed = urlsplit(part)
        if parsed.scheme != SENTINEL_SCHEME or not parsed.hostname:
            raise ValueError(f"MODELQ_REDIS_URL: {part.rsplit('@', 1)[-1]!r} is not a sentinel://host:port "
                             "address; join sentinels with ';' (sentinel://h1:26379;sentinel://h2:26379/0)")
        try:
            nodes.append((parsed.hostname, parsed.port or DEFAULT_SENTINEL_PORT))
            if parsed.path.strip("/"):
                dbs.add(int(parsed.path.strip("/")))
        except ValueError:
            raise ValueError(f"MODELQ_REDIS_URL: {part.rsplit('@', 1)[-1]!r} needs a numeric port "
                             "and database (sentinel://host:26379/0)") from None
        username = username or (unquote(parsed.username) if parsed.username else None)
        password = password or (unquote(parsed.password) if parsed.password else None)
    if len(dbs) > 1:
        raise ValueError(f"MODELQ_REDIS_URL names several databases {sorted(dbs)}: name one, once")
    if not nodes:
        raise ValueError("MODELQ_REDIS_URL: sentinel:// needs at least one sentinel host")
    return SentinelTarget(tuple(nodes), master, dbs.pop() if dbs else 0, username, password)


def default_home() -> Path:
    """The user's cache folder for modelq: $XDG_CACHE_HOME/modelq, else ~/.cache/modelq."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelq"


class Settings(BaseSettings):
    """Everything a producer or worker reads from the environment.

    Tests build one directly (`Settings(redis_url=...)`) instead of patching globals.
    """

    model_config = SettingsConfigDict(env_prefix="MODELQ_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=default_home)
    """modelq's own folder: the embedded Redis's data and `up.json`, the demo model."""

    redis_url: str = Field(default="", validate_default=True)
    """Redis for the broker, records and registry; AUTH/TLS go in the URL (rediss://user:pw@host).

    Under Redis Sentinel: `sentinel://[:pw@]s1:26379;sentinel://s2:26379/0` (Celery's form;
    the password is the master's), with `sentinel_master` naming the master.
    Unset: the embedded Redis that `modelq up` runs (found through `home/up.json`),
    else redis://127.0.0.1:6379/0.
    """

    sentinel_master: str = "mymaster"
    """With a sentinel:// URL: the name the sentinels monitor the master under."""

    sentinel_password: SecretStr | None = None
    """With a sentinel:// URL: the sentinels' own password, if they have `requirepass` set."""

    key_prefix: str = "modelq"
    """Prefix of every Redis key modelq writes, so several deployments can share one Redis."""

    max_load_seconds: int = Field(default=3600, gt=0)
    """The longest a load may run; the broker's visibility timeout is set above it."""

    max_run_seconds: float | None = Field(default=None, ge=0)
    """The longest a run job that names no `timeout_seconds` may run (the load it starts
    with included) before it fails as TimedOut. Unset or 0 (the default): no limit, so a
    training run of days is not cut short; a job's own `timeout_seconds` always wins. The
    limit a job runs under is in its record (`time_limit_seconds`). Not tied to the broker's
    visibility timeout: a run longer than that is never started twice (its lease decides)."""

    @field_validator("max_run_seconds")
    @classmethod
    def _no_limit(cls, value: float | None) -> float | None:
        return value or None  # 0: no limit

    record_ttl_seconds: int = Field(default=7 * 24 * 3600, gt=0)
    """How long a finished job's record and events stay readable."""

    heartbeat_seconds: float = Field(default=2.0, gt=0)
    """How often a worker refreshes its registry entry."""

    worker_ttl_seconds: float = Field(default=10.0, gt=0)
    """A worker whose entry is not refreshed for this long is gone."""

    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    """How long a client waits for Redis before `submit` fails with BrokerUnavailable."""

    command_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long a Redis command may go unanswered (a Redis that accepts connections but never
    replies) before it fails with BrokerUnavailable; blocking reads get their block on top."""

    artifact_dir: str | None = None
    """Where quantized weights are saved for reuse by the workers of this host
    (default: `home`/artifacts, so MODELQ_HOME moves them too)."""

    checkpoint_dir: str | None = None
    """Where training jobs write their resumable checkpoints, one folder per tenant and job
    (default: `home`/checkpoints, which serves the workers of one host). A pool across hosts
    points it at a folder every worker mounts, so a job's next attempt resumes wherever it runs."""

    @property
    def checkpoint_root(self) -> Path:
        """`checkpoint_dir`, or its default under `home`."""
        return Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else self.home / "checkpoints"

    keep_alive_check_seconds: float = Field(default=1.0, gt=0)
    """How often a worker unloads models whose keep-alive has passed."""

    lost_job_grace_seconds: float = Field(default=30.0, gt=0)
    """A `queued` job with no message anywhere this long after it was written (or a message
    its worker took this long ago without starting it) is sent again by the reaper's sweep."""

    max_attempts: int = Field(default=3, ge=1)
    """Deliveries of one job before it fails as WorkerLost."""

    max_result_bytes: int = Field(default=1 << 20, gt=0, le=64 << 20)
    """The largest result a run job's task may return, as JSON (ResultTooLarge above it)."""

    task_modules: Annotated[tuple[str, ...], NoDecode] = ()
    """Workers: modules of model tasks imported at start (`modelq worker --tasks MODULE`),
    as a JSON list or comma-separated."""

    remote_control: bool = True
    """Workers answer Celery's remote control (`celery inspect ping`, Flower), and send
    heartbeat events so that `celery control enable_events` and Flower can turn task events on."""

    worker_events: bool = False
    """Workers send task events from the start (`modelq worker -E`; Celery's `-E`) for
    `celery events` and Flower; off, Flower turns them on by remote control once it runs."""

    roots: Annotated[tuple[str, ...], NoDecode] = ()
    """Single-tenant workers: the only folders local models, adapters and task paths may lie
    under (a JSON list or comma-separated; `~` expanded, links followed). Unset, any path the
    worker can read may be named: set it on any pool that more than one person submits to.
    Multi-tenant workers use each tenant's `roots` from the tenants file instead."""

    batch_max_jobs: int = Field(default=32, ge=1, le=1024)
    """Workers: queued run jobs of a batchable task on one resident model that share one call
    (docs/batching.md); 1 turns cross-job batching off."""

    batch_wait_ms: int = Field(default=10, ge=0, le=10_000)
    """Workers: how long a batch waits after its first job for more to arrive (0: it takes only
    the jobs already queued)."""

    log_json: bool = False
    """Log one JSON object per line (with job id, tenant and worker) instead of plain text."""

    max_body_bytes: int = Field(default=(1 << 20) + (64 << 10), gt=0)
    """The gateway's largest request body: 413 above it, before it is parsed (a run job's args
    and kwargs may take 1 MiB as JSON; the rest of a job fits in the 64 KiB over that)."""

    @field_validator("task_modules", "roots", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("redis_url")
    @classmethod
    def _find_redis(cls, value: str, info: ValidationInfo) -> str:
        if value:
            return value
        from tasks.embedded import discover

        home = info.data.get("home")
        return (discover(home) if home is not None else None) or DEFAULT_REDIS_URL

    @field_validator("sentinel_master")
    @classmethod
    def _check_sentinel_url(cls, value: str, info: ValidationInfo) -> str:
        url = info.data.get("redis_url", "")
        if url.startswith(f"{SENTINEL_SCHEME}:"):
            parse_sentinel_url(url, value)  # a malformed URL fails at start, not at first use
        return value

    @property
    def sentinel(self) -> SentinelTarget | None:
        """Where Sentinel says Redis is, when `redis_url` is a sentinel:// URL; else None."""
        if not self.redis_url.startswith(f"{SENTINEL_SCHEME}:"):
            return None
        return parse_sentinel_url(self.redis_url, self.sentinel_master)

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection options for the sentinels themselves: bounded waits, their password if any."""
        options: dict[str, Any] = {"socket_connect_timeout": self.connect_timeout_seconds,
                                   "socket_timeout": self.connect_timeout_seconds}
        if self.sentinel_password is not None:
            options["password"] = self.sentinel_password.get_secret_value()
        return options

    @property
    def redis_configured(self) -> bool:
        """Whether a Redis URL was given (argument or MODELQ_REDIS_URL) rather than found."""
        return "redis_url" in self.model_fields_set and bool(self.redis_url)
    tenant: str | None = None
    """The tenant this producer acts for; set, its jobs are signed and its reads are checked."""

    tenant_key: SecretStr | None = None
    """The tenant's shared secret (from the tenants file) that signs its job envelopes."""

    tenants_file: Path | None = None
    """Workers and the gateway: the TOML tenants file; unset, modelq is single-tenant."""

    signature_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    """How long a signed envelope may wait in a queue before a worker refuses it as expired."""

    visibility_timeout_seconds: int | None = Field(default=None, gt=0)
    """Seconds before the broker delivers an unacked task again; default max_load_seconds + 600.

    A load that outlives it is not run twice: the running worker's lease turns the
    second delivery away (worker/jobs/lease.py). Tests set it low to see redelivery fast.
    """

    @property
    def visibility_timeout(self) -> int:
        """Seconds before an unacked task is delivered again: above the longest load."""
        return self.visibility_timeout_seconds or self.max_load_seconds + 600

    @property
    def restore_interval(self) -> int:
        """Seconds between the broker's sweeps that put back tasks past the visibility timeout."""
        return max(1, min(10, self.visibility_timeout // 4))
