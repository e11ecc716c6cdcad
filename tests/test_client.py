"""tasks/client.py against the real redis-server, with no worker: what submit writes and
sends, what it refuses, and cancelling a queued job."""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest
import redis

from schemas import (
    BrokerUnavailable,
    InvalidJob,
    JobStatus,
    LoadJob,
    ModelNotFound,
    TimedOut,
    decode_envelope,
)
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import SHARED_QUEUE

KEY = "0123456789abcdef0123456789abcdef"


def _queued_messages(r: redis.Redis) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in r.lrange(SHARED_QUEUE, 0, -1)]


def test_submit_writes_the_record_then_sends_the_envelope(client: Client) -> None:
    handle = client.submit({"kind": "load", "model": "org/model", "quantization": "nf4"})
    record = handle.status()
    assert record.status is JobStatus.queued and record.attempt == 0 and record.worker is None
    assert record.job == LoadJob(model="org/model", quantization="nf4")
    (message,) = _queued_messages(client.redis)
    assert message["headers"]["id"] == handle.job_id and message["headers"]["task"] == "modelq.run"
    assert message["content-type"] == "application/json"
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    envelope = decode_envelope(args[0])
    assert envelope.job_id == handle.job_id and envelope.job == record.job
    assert [e.message for e in handle.events(timeout=0.2)] == ["submitted"]


def test_invalid_job_is_refused_and_nothing_is_written(client: Client) -> None:
    with pytest.raises(InvalidJob, match="quantization"):
        client.submit({"kind": "load", "model": "o/m",
                       "quantization": {"method": "int8", "double_quant": True}})
    with pytest.raises(InvalidJob, match="kind"):
        client.submit({"kind": "nope"})
    assert client.redis.dbsize() == 0


def test_attach_to_a_model_no_worker_holds_is_refused_and_leaves_nothing(client: Client) -> None:
    with pytest.raises(ModelNotFound, match="not resident"):
        client.submit({"kind": "attach", "model_key": KEY, "adapter": "/a"})
    assert client.redis.dbsize() == 0


def test_submit_works_after_redis_forgot_its_scripts(client: Client) -> None:
    client.submit(LoadJob(model="o/m"))
    client.redis.script_flush()  # what a Redis restart does to loaded scripts
    record = client.submit(LoadJob(model="o/n")).status()
    assert record.status is JobStatus.queued and len(_queued_messages(client.redis)) == 2


def test_unreachable_redis_fails_fast_with_broker_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    client = Client(Settings(redis_url=f"redis://:secret@127.0.0.1:{port}/0", connect_timeout_seconds=2))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="nothing was enqueued") as info:
        client.submit(LoadJob(model="o/m"))
    assert time.monotonic() - started < 5
    assert "secret" not in info.value.message and isinstance(info.value, ConnectionError)


def test_a_failed_send_leaves_no_record_behind(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise redis.ConnectionError("broker went away")

    monkeypatch.setattr(client.app, "send_task", refuse)
    with pytest.raises(BrokerUnavailable):
        client.submit(LoadJob(model="o/m"))
    assert client.redis.keys("*") == []
    assert client.redis.llen(SHARED_QUEUE) == 0


def test_cancel_of_a_queued_job_ends_it_at_once(client: Client) -> None:
    handle = client.submit(LoadJob(model="o/m"))
    record = handle.cancel()
    assert record.status is JobStatus.cancelled and record.finished_at is not None
    assert handle.wait(timeout=5).status is JobStatus.cancelled
    assert handle.cancel() == record  # a second cancel changes nothing


def test_cancel_of_a_running_job_asks_the_worker(client: Client) -> None:
    handle = client.submit(LoadJob(model="o/m"))
    client.store.transition(handle.job_id, JobStatus.running, worker="w1")
    assert handle.cancel().status is JobStatus.running
    assert client.store.cancel_requested(handle.job_id)


def test_wait_times_out_while_the_job_goes_on(client: Client) -> None:
    handle = client.submit(LoadJob(model="o/m"))
    with pytest.raises(TimedOut, match="still queued"):
        handle.wait(timeout=0.3)
    assert handle.status().status is JobStatus.queued
