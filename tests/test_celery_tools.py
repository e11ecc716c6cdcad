"""Celery's own tools on a modelq pool: `celery -A tasks.app:app inspect/events` and Flower.

The end-to-end tests run them as a user would, in subprocesses with MODELQ_REDIS_URL set,
against a real Redis and real `modelq worker` processes, and read what they print.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from schemas import JobStatus, LoadJob, ModelRef
from tasks.app import create_app, default_app
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import worker_queue
from tests.support.fault_waits import wait_for
from tests.support.tenancy import tenant_client, write_tenants
from tests.support.workers import WorkerPool

ROOT = Path(__file__).resolve().parent.parent
ACME_KEY = "acme-key-0123456789abcdef0"

needs_flower = pytest.mark.skipif(importlib.util.find_spec("flower") is None,
                                  reason="flower is not installed: pip install 'modelq[flower]'")
"""Decided before any fixture starts Redis or a worker (the test extra installs flower)."""


def celery_env(redis_url: str, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "FLOWER_"))}
    return {**env, "MODELQ_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1", **more}


def celery(redis_url: str, *args: str) -> str:
    """`python -m celery -A tasks.app:app ARGS`: its stdout, after a zero exit."""
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks.app:app", *args],
                          env=celery_env(redis_url), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# --- the app that `-A` finds -------------------------------------------------------------


def test_importing_the_module_builds_nothing() -> None:
    code = ("import tasks.app as m; assert m.default_app.cache_info().currsize == 0; "
            "print(m.app.conf.broker_url)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=celery_env("redis://:pw@nowhere.invalid:6390/4"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "redis://:pw@nowhere.invalid:6390/4"


def test_celery_finds_the_app_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.app.utils import find_app

    monkeypatch.setenv("MODELQ_REDIS_URL", "sentinel://:pw@s1:26379;sentinel://s2:26380/2")
    monkeypatch.setenv("MODELQ_SENTINEL_MASTER", "jobs")
    default_app.cache_clear()
    try:
        for name in ("tasks.app:app", "tasks.app"):
            conf = find_app(name).conf
            assert conf.broker_url == "sentinel://:pw@s1:26379/2;sentinel://s2:26380"
            assert conf.broker_transport_options["master_name"] == "jobs"
            assert conf.worker_enable_remote_control is True
    finally:
        default_app.cache_clear()


def test_monitoring_names_follow_the_key_prefix() -> None:
    conf = create_app(Settings(redis_url="redis://h/0", key_prefix="team", worker_events=True)).conf
    assert (conf.control_exchange, conf.event_exchange, conf.event_queue_prefix) == (
        "team", "team.celeryev", "team.celeryev")
    assert conf.worker_send_task_events is True
    assert conf.broker_transport_options["global_keyprefix"] == ""  # queue keys keep their names
    off = create_app(Settings(redis_url="redis://h/0", remote_control=False)).conf
    assert off.worker_enable_remote_control is False and off.worker_send_task_events is False


def test_worker_stats_hide_the_sentinel_password() -> None:
    from worker.celery_worker import scrub_passwords

    stats = {"broker": {"transport_options": {"master_name": "m", "sentinel_kwargs": {
        "password": "s3cret", "socket_timeout": 5}}, "hostname": "h"}, "pid": 1}
    scrubbed = scrub_passwords(stats)
    assert "s3cret" not in json.dumps(scrubbed)
    assert scrubbed["broker"]["transport_options"]["sentinel_kwargs"]["socket_timeout"] == 5


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_inspect_and_events_answer_from_a_worker(redis_url: str, settings: Settings, pool: WorkerPool,
                                                 models: dict[str, Path], tmp_path: Path) -> None:
    tenants = write_tenants(tmp_path / "tenants.toml", {
        "acme": {"key": ACME_KEY, "roots": [str(models["llama"].parent)], "priority": 2}})
    pool.start("w1", "-E", env={"MODELQ_TENANTS_FILE": str(tenants)})
    node = f"w1@{socket.gethostname()}"

    ping = celery(redis_url, "inspect", "ping", "--timeout", "10", "-d", node)
    assert f"->  {node}: OK" in ping and "pong" in ping
    listed = celery(redis_url, "inspect", "active_queues", "--timeout", "10", "-d", node, "--json")
    queues = {q["name"] for q in json.loads(listed)[node]}
    own = worker_queue("w1")
    assert queues == {"modelq", own}  # the tenant shares reach them by turns (tasks/state/turns.py)
    registered = celery(redis_url, "inspect", "registered", "--timeout", "10", "-d", node)
    assert "* modelq.run" in registered

    dump = tmp_path / "events.txt"
    with open(dump, "wb") as out:
        events = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks.app:app", "events",
                                   "--dump"], env=celery_env(redis_url), cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: f"{node} [" in dump.read_text() and "heartbeat" in dump.read_text(),
                 timeout=60, what="a heartbeat in `celery events --dump`")
        acme = tenant_client(settings, "acme", ACME_KEY)
        record = acme.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(timeout=120)
        assert record.status is JobStatus.succeeded, record.error
        for seen in ("received", "started", "succeeded"):
            wait_for(lambda s=seen: f"task {s}: modelq.run({record.job_id})" in dump.read_text(),
                     timeout=30, what=f"task-{seen} in `celery events --dump`")
    finally:
        events.terminate()
        events.wait(10)
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).keys("*")}
    assert "_kombu.binding.modelq.pidbox" in keys and "_kombu.binding.modelq.celeryev" in keys
    assert not {k for k in keys if "celery.pidbox" in k or k.startswith("celeryev")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str, auth: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith((b"{", b"[")) else body
    except urllib.error.HTTPError as error:
        return error.code, None
    except OSError:
        return 0, None


@pytest.mark.e2e
@needs_flower
def test_flower_shows_workers_and_tasks_behind_basic_auth(redis_url: str, client: Client,
                                                          pool: WorkerPool, models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    worker = pool.start("w2")  # no -E: Flower turns task events on by remote control
    node, port, auth = f"w2@{socket.gethostname()}", free_port(), "ops:s3cret-pw"
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "flower.log", "wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks.app:app", "flower", f"--port={port}",
             "--address=127.0.0.1"], env=celery_env(redis_url, FLOWER_BASIC_AUTH=auth), cwd=ROOT,
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: get(f"{base}/healthcheck")[0] == 200, timeout=60, what="Flower up")
        assert get(f"{base}/api/workers")[0] == 401
        assert get(f"{base}/api/workers", "ops:wrong")[0] == 401
        workers = wait_for(lambda: node in (get(f"{base}/api/workers?refresh=1", auth)[1] or {}),
                           timeout=60, what=f"{node} in Flower's /api/workers")
        assert workers
        wanted = {"modelq", worker_queue("w2")}  # Flower learns them from the worker's inspect replies

        def queue_names() -> set[str]:
            status, lengths = get(f"{base}/api/queues/length", auth)
            assert status == 200
            names = {q["name"] for q in (lengths or {}).get("active_queues", [])}
            if names != wanted:  # a reply later than Flower's inspect timeout (1 s) was missed
                get(f"{base}/api/workers?refresh=1", auth)  # on a loaded host: ask again
            return names

        wait_for(lambda: queue_names() == wanted, timeout=60, what="modelq's queues in Flower")
        wait_for(lambda: "enabled by remote" in worker.log_text(), timeout=60,
                 what="Flower enabling task events")
        record = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(timeout=120)
        assert record.status is JobStatus.succeeded, record.error
        assert get(f"{base}/api/tasks")[0] == 401
        task = wait_for(lambda: (get(f"{base}/api/tasks", auth)[1] or {}).get(record.job_id),
                        timeout=30, what="the job in Flower's /api/tasks")
        assert (task["name"], task["state"], task["worker"]) == ("modelq.run", "SUCCESS", node)
    finally:
        flower.terminate()
        flower.wait(10)
    assert auth.split(":")[1] not in (tmp_path / "flower.log").read_text()
