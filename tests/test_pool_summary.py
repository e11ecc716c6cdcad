"""`modelq ls` summarizes the pool (workers by device and state, models by base, free
bytes) and lists every worker only for a small pool or with `--all`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import redis

from schemas import ResidentModel, WorkerInfo
from tasks.cli.pool_listing import Listed, listed, read_pool
from tasks.cli.pool_summary import summarize, summary_lines
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import Keys
from worker.recovery.heartbeat import Heartbeat, WorkerState

NOW = datetime.now(UTC)


def _info(name: str, device: str, free: int, bases: tuple[str, ...] = (), *,
          beat_ago: float = 0.0) -> Listed:
    now = datetime.now(UTC)  # not the import's time: the suite may run long before this test
    models = tuple(ResidentModel(model_key=f"{name}-{i}", base=base, tenant="acme", bytes=1 << 30,
                                 last_used=now) for i, base in enumerate(bases))
    info = WorkerInfo(name=name, host=name.split("-")[0], pid=1, device=device, queue=f"q.{name}",
                      capacity_bytes=8 << 30, free_bytes=free, models=models, started_at=now,
                      heartbeat_at=now - timedelta(seconds=beat_ago))
    return listed(info.model_dump(mode="json"))  # as ls reads an entry: its JSON


def test_summary_counts_states_devices_and_bases() -> None:
    summary = summarize([
        _info("a-0", "cuda:0", 4 << 30, ("llama", "qwen")),
        _info("a-1", "cuda:1", 0, ("llama",)),
        _info("b-0", "cuda:0", 2 << 30, beat_ago=30),
        _info("b-1", "cpu", 1 << 30, ("llama",)),
    ], late_after=5)
    assert summary.workers == 4 and summary.hosts == 2
    assert dict(summary.devices["cuda"].states) == {"ready": 1, "full": 1, "late": 1}
    assert summary.devices["cuda"].free == 6 << 30 and summary.devices["cuda"].capacity == 24 << 30
    assert dict(summary.devices["cpu"].states) == {"ready": 1}
    assert list(summary.bases) == ["llama", "qwen"]  # most copies first
    assert summary.bases["llama"].copies == 3 and summary.bases["llama"].workers == {"a-0", "a-1", "b-1"}


def test_an_empty_pool_summarizes_as_its_title_and_headings() -> None:
    lines = list(summary_lines(summarize([], late_after=5), width=80))
    assert lines == ["modelq pool: 0 worker(s) on 0 host(s), 0 resident model(s)",
                     "device  ready  full  late  workers  capacity  free"]


def _register(url: str, count: int, base: str = "org/base-7b") -> None:
    client = redis.Redis.from_url(url)
    for i in range(count):
        name = f"host{i // 4}-gpu{i % 4}"
        models = [ResidentModel(model_key=f"key{i}", base=base if i % 2 else "org/other",
                                tenant="acme" if i % 3 else "*", shared_by=() if i % 3 else ("acme",),
                                adapters=("a@acme", "b@bob"), bytes=1 << 30, last_used=NOW)]
        state = WorkerState(capacity=8 << 30, free=(i % 3) << 30, models=models)
        Heartbeat(client, Keys(), (name, f"cuda:{i % 4}"), state=lambda s=state: s,
                  timing=(2.0, 60.0)).register()


def _ls(url: str, *args: str) -> str:
    env = {**os.environ, "MODELQ_REDIS_URL": url, "COLUMNS": "100", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "tasks.cli", "ls", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=True).stdout


def test_ls_prints_a_summary_and_lists_workers_only_with_all(redis_url: str) -> None:
    _register(redis_url, 12)
    summary = _ls(redis_url)
    assert "12 worker(s) on 1 host(s), 12 resident model(s)" in summary, summary
    assert "org/base-7b" in summary and "org/other" in summary
    assert "host0-gpu1" not in summary  # no line per worker past a small pool
    full = _ls(redis_url, "--all")
    assert all(f"host{i // 4}-gpu{i % 4}" in full for i in range(12)), full
    assert "key11" in full
    listed = json.loads(_ls(redis_url, "--json"))
    assert sorted(w["name"] for w in listed) == sorted(f"host{i // 4}-gpu{i % 4}" for i in range(12))


def test_ls_reads_entries_as_the_registry_does(redis_url: str) -> None:
    """`modelq ls` parses entries lightly (json, no schemas): the same workers, beat times and
    models as the validated `Client.workers`; a tenant's ls sees only what the client shows it."""
    _register(redis_url, 6)
    full = Client(Settings(redis_url=redis_url)).workers()
    assert read_pool(Settings(redis_url=redis_url)) == [listed(w.model_dump(mode="json")) for w in full]
    assert {m.tenant for w in full for m in w.models} == {"acme", "*"}
    bob = read_pool(Settings(redis_url=redis_url, tenant="bob"))
    assert [w.name for w in bob] == [w.name for w in full]
    assert {m.tenant for w in bob for m in w.models} == {"*"}
    assert {a for w in bob for m in w.models for a in m.adapters} == {"b"}


def test_ls_summary_fits_the_terminal_and_folds_long_bases(redis_url: str) -> None:
    base = "org/" + "a-very-long-base-model-name-" * 5
    _register(redis_url, 12, base=base)
    out = _ls(redis_url)
    assert all(len(line) <= 100 for line in out.splitlines()), out
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("org/a-very"))
    assert lines[row].split()[1:] == ["6", "6", "1", "6.0", "GiB"], out  # copies, workers, ...
    rebuilt = lines[row].split()[0]
    for line in lines[row + 1:]:
        if len(rebuilt) >= len(base):
            break
        rebuilt += line  # the base folded under itself, whole
    assert rebuilt == base, out


def test_ls_on_a_large_pool_imports_no_schemas_rich_or_client(redis_url: str) -> None:
    """What keeps `modelq ls` fast at pool scale (bench.scale's ls_seconds): it starts without
    the modules that cost most to import, and parses entries without validating them."""
    _register(redis_url, 12)  # past SMALL_POOL: the summary only, plain lines
    code = ("import sys\nfrom tasks.cli.main import main\ntry:\n    main(['ls'])\nexcept SystemExit:\n"
            "    pass\nprint('IMPORTED', sorted(m for m in ('schemas', 'rich', 'tasks.client', "
            "'celery', 'kombu') if m in sys.modules))")
    env = {**os.environ, "MODELQ_REDIS_URL": redis_url, "COLUMNS": "100"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    assert "12 worker(s)" in out and "IMPORTED []" in out, out
