"""Bytes on a queue that kombu cannot decode never stop a worker: they are moved aside."""

from __future__ import annotations

import base64
import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from schemas import JobStatus, LoadJob, ModelRef
from tasks.client import Client
from tasks.state.keys import DEFAULT_KEYS, worker_queue
from tests.support.fault_waits import wait_for
from tests.support.workers import WorkerPool
from worker.recovery.quarantine import KEPT_BYTES, entry, problem, read

pytestmark = pytest.mark.e2e


def envelope(body: str, encoding: str | None = "base64",
             content_type: str = "application/json") -> str:
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": content_type,
                       "headers": {"id": "bad", "task": "modelq.run"},
                       "properties": {"body_encoding": encoding, "delivery_tag": "t",
                                      "delivery_info": {"exchange": "", "routing_key": "x"}}})


BAD = [envelope("%%% not base64 %%%"), envelope("e30=", encoding="rot13"),
       envelope("e30=", content_type="application/x-python-serialize")]

def shaped(**changes: Any) -> str:
    """A decodable kombu envelope (JSON, base64 body, delivery tag) with fields of a wrong shape."""
    message = json.loads(envelope(base64.b64encode(b'[["x"], {}, {}]').decode()))
    for path, value in changes.items():
        *parents, name = path.split("__")
        target = message
        for parent in parents:
            target = target[parent]
        target[name] = value
    return json.dumps(message)


WRONG_SHAPE = [shaped(headers="a string"), shaped(headers=["a", "list"]),
               shaped(properties__delivery_info="a string"), shaped(properties__delivery_info={}),
               shaped(body=base64.b64encode(b"5").decode()), shaped(headers__id=["not", "a", "str"])]
"""Envelopes kombu decodes that kombu's own parse or Celery's then chokes on (the first: kombu
calls `headers.get`, AttributeError). `problem` names the first four; the last two pass it and
are caught around the delivery (the fifth: Celery asks `'args' in 5`, TypeError)."""

HUGE = bytes(range(256)) * 4096  # 1 MiB, not UTF-8
GARBAGE = [b"not json at all", b"\xff\xfe\x00\x1b[31m", b"", HUGE, b"[1, 2]",
           json.dumps({"body": "e30=", "properties": {}, "content-type": "application/json"})]
"""Bytes that are no kombu message at all (the last: an envelope without a delivery tag)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_problem_names_what_kombu_would_choke_on() -> None:
    assert problem(json.loads(envelope("e30="))) is None
    assert [problem(json.loads(raw)) is not None for raw in BAD] == [True, True, True]
    assert read(envelope("e30=").encode())[1] is None
    assert [read(raw)[0] for raw in GARBAGE] == [None] * len(GARBAGE)
    assert [problem(json.loads(raw)) is not None for raw in WRONG_SHAPE] == [True] * 4 + [False] * 2
    assert [read(raw)[1] for raw in GARBAGE[2:5]] == [
        "empty", "not JSON (Expecting value: line 1 column 1 (char 0))", "not a kombu envelope"]


def test_a_dead_letter_keeps_the_bytes_whole_up_to_a_limit() -> None:
    kept = json.loads(entry("q", "why", GARBAGE[1]))
    assert kept["body_encoding"] == "base64" and base64.b64decode(kept["body"]) == GARBAGE[1]
    assert kept["size"] == kept["kept"] == len(GARBAGE[1])
    cut = json.loads(entry("q", "why", b"x" * (KEPT_BYTES + 1)))
    assert cut["body"] == "x" * KEPT_BYTES and cut["size"] == KEPT_BYTES + 1


def test_undecodable_messages_are_moved_aside_and_the_worker_goes_on(
        client: Client, pool: WorkerPool, models: dict[str, Path]) -> None:
    port = free_port()
    worker = pool.start("w1", "--metrics-port", str(port))
    for i, raw in enumerate([*BAD, *GARBAGE, *WRONG_SHAPE]):  # onto both of its queues
        client.redis.lpush(worker_queue("w1") if i % 2 else DEFAULT_KEYS.queue(), raw)
    record = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])))).wait(120)
    assert record.status is JobStatus.succeeded, record.error
    assert worker.alive()
    dead = client.keys.dead_letters()
    count = len(BAD) + len(GARBAGE) + len(WRONG_SHAPE)
    wait_for(lambda: client.redis.llen(dead) == count, 30, "the bad messages moved aside")
    entries = [json.loads(e) for e in client.redis.lrange(dead, 0, -1)]
    reasons = [e["reason"] for e in entries]
    assert any("not base64" in r for r in reasons) and any("rot13" in r for r in reasons)
    assert {"empty", "not a kombu envelope", "a kombu envelope with no delivery tag"} <= set(reasons)
    assert {"headers that are a str, not an object", "headers that are a list, not an object"} <= set(reasons)
    assert sum(r.startswith("a message kombu or Celery could not take (") for r in reasons) == 2
    huge = next(e for e in entries if e["size"] == len(HUGE))
    assert base64.b64decode(huge["body"]) == HUGE[:KEPT_BYTES] and huge["kept"] == KEPT_BYTES
    assert {e["queue"] for e in entries} == {"modelq", worker_queue("w1")}
    log_text = worker.log_text()
    assert log_text.count("moved an undecodable message") == count
    assert r"(8 bytes: b'\xff\xfe\x00\x1b[31m')" in log_text  # escaped: no terminal escape
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f"modelq_dead_letters {float(count)}" in scraped
    assert f"modelq_dead_lettered_total {float(count)}" in scraped
