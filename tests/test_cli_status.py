"""`modelq status JOB_ID` as a fresh process imports only what it needs (its 0.5 s line: rich,
the Celery stack and the gateway's libraries cost a fresh process tenths of a second), and its
plain-text table says what rich's did."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import redis
from rich.console import Console

from schemas import ErrorInfo, JobRecord, JobStatus, LoadJob
from tasks.cli.render import record_table, record_text
from tasks.settings import Settings
from tasks.state.keys import Keys
from tasks.state.store import Store, now

NOT_NEEDED = ("rich", "celery", "kombu", "torch", "transformers", "worker", "fastapi", "starlette",
              "httpx", "uvicorn", "jsonschema", "tasks.app", "tasks.gateway.api")
"""Modules `modelq status` has no use for (each costs a fresh process tens of milliseconds)."""
PROBE = """
import sys
from tasks.cli.main import main
try:
    main({args!r})
except SystemExit as exc:
    assert not exc.code, exc.code
print("IMPORTED", sorted(m for m in {not_needed!r} if m in sys.modules))
"""


def _failed(store: Store) -> JobRecord:
    record = JobRecord(job_id="j1", kind="load", tenant="default", status=JobStatus.queued, created_at=now(),
                       job=LoadJob(model="o/m"))
    store.create(record)
    store.transition("j1", JobStatus.running)
    error = ErrorInfo(type="LoadFailed", message="first line\nsecond line", retryable=False)
    store.transition("j1", JobStatus.failed, error=error)
    return store.get("j1")


def test_status_imports_only_what_it_needs(settings: Settings) -> None:
    _failed(Store(redis.Redis.from_url(settings.redis_url), Keys(settings.key_prefix), 60))
    for args in (["status", "j1"], ["status", "j1", "--json"]):
        code = PROBE.format(args=args, not_needed=NOT_NEEDED)
        env = {**os.environ, "MODELQ_REDIS_URL": settings.redis_url}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=60, check=True).stdout
        assert "IMPORTED []" in out, out
        assert ('"status": "failed"' if "--json" in args else "status     failed") in out, out


def test_the_plain_table_says_what_the_rich_table_said(settings: Settings) -> None:
    record = _failed(Store(redis.Redis.from_url(settings.redis_url), Keys(settings.key_prefix), 60))
    rich = io.StringIO()
    Console(file=rich, width=200, color_system=None, soft_wrap=True).print(record_table(record))
    assert record_text(record).splitlines() == [line.rstrip() for line in rich.getvalue().splitlines()]
    assert "  second line" in record_text(record)  # a value's further lines stay in its column
    assert record_text(record, bold=True).startswith("\x1b[1mjob\x1b[0m")
