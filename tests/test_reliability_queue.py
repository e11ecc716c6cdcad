"""Bytes on a queue that kombu cannot decode never stop a worker: they are moved aside."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from schemas import JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tasks.keys import worker_queue
from tests.support.faults import wait_for
from tests.support.workers import WorkerPool
from worker.quarantine import problem

pytestmark = pytest.mark.e2e


def envelope(body: str, encoding: str | None = "base64",
             content_type: str = "application/json") -> str:
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": content_type,
                       "headers": {"id": "bad", "task": "modelq.run"},
                       "properties": {"body_encoding": encoding, "delivery_tag": "t",
                                      "delivery_info": {"exchange": "", "routing_key": "x"}}})


BAD = [envelope("%%% not base64 %%%"), envelope("e30=", encoding="rot13"),
       envelope("e30=", content_type="application/x-python-serialize")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_problem_names_what_kombu_would_choke_on() -> None:
    assert problem(json.loads(envelope("e30="))) is None
    assert [problem(json.loads(raw)) is not None for raw in BAD] == [True, True, True]


def test_undecodable_messages_are_moved_aside_and_the_worker_goes_on(
        client: Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    port = free_port()
    worker = pool.start("w1", "--metrics-port", str(port))
    for raw in [*BAD, "not json at all"]:
        client.redis.lpush(worker_queue("w1"), raw)
    dead = client.keys.dead_letters()
    wait_for(lambda: client.redis.llen(dead) == len(BAD), 30, "the bad messages moved aside")
    record = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(120)
    assert record.status is JobStatus.succeeded, record.error
    assert worker.alive()
    reasons = [json.loads(e)["reason"] for e in client.redis.lrange(dead, 0, -1)]
    assert any("not base64" in r for r in reasons) and any("rot13" in r for r in reasons)
    assert "moved an undecodable message" in worker.log_text()
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f"modelq_dead_letters {float(len(BAD))}" in scraped
