"""Bad input at scale, property-based: job payloads through the client, raw messages on the queue.

Every payload is either a valid job (recorded and queued) or refused with a typed error
and nothing written. Every raw message a producer could put straight on the shared
queue (garbage args, wrong types, missing job_id, non-JSON bodies, unknown tasks,
pickle) is run or refused by a real worker: the worker survives, and no record is
left half-written.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange

from schemas import InvalidJob, Job, JobKind, JobRecord, JobStatus, LoadJob, ModelqError, ModelRef, parse_job
from tasks.app import TASK_RUN
from tasks.client import Client
from tasks.state.keys import SHARED_QUEUE
from tasks.state.store import now
from tests.support.workers import WorkerPool

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)

job_fields = {
    "kind": st.sampled_from(["load", "attach", "unload", "train", ""]) | junk,
    "model": st.sampled_from([{"path": "/tmp"}, {"repo_id": "org/model"}, {"repo_id": "no spaces!"},
                              "org/model", "/tmp"]) | junk,
    "tenant": st.sampled_from(["default", "team-a", "Team A", ""]) | junk,
    "dtype": st.sampled_from(["auto", "float16", "int3"]) | junk,
    "quantization": st.sampled_from([{"method": "nf4"}, {"method": "int8"}, {"method": "q2"}]) | junk,
    "adapters": st.lists(st.sampled_from(["/tmp", {"ref": "/tmp", "name": "a"},
                                          {"ref": "/tmp", "name": "a"}]), max_size=3) | junk,
    "timeout_seconds": st.none() | st.floats() | st.integers(-5, 5) | junk,
    "model_key": st.sampled_from(["0" * 32, "not-hex"]) | junk,
    "trust_remote_code": st.booleans() | junk,
}
payloads = st.fixed_dictionaries({}, optional=job_fields) | junk


@FUZZ
@given(payload=payloads)
@example(payload={"kind": "load", "model": "org/model", "dtype": "float16"})  # taken
@example(payload={"kind": "unload", "model_key": "0" * 32})  # valid, but no worker holds it
@example(payload={"kind": "load", "model": {"repo_id": "no spaces!"}})  # refused
def test_client_submit_accepts_valid_jobs_and_refuses_the_rest_writing_nothing(
        client: Client, payload: Any) -> None:
    try:  # the contract's own verdict, for the client to agree with
        valid: Job | None = parse_job(payload)
    except InvalidJob:
        valid = None
    before = client.redis.dbsize()
    try:
        handle = client.submit(payload) if isinstance(payload, dict) else client.submit(parse_job(payload))
    except ModelqError as exc:
        assert exc.message
        if valid is None:
            assert exc.type == "InvalidJob"
        else:  # attach and unload name a model: refused when no worker holds it
            assert exc.type == "ModelNotFound" and valid.kind in ("attach", "unload"), exc.message
        assert client.redis.dbsize() == before, "a refused job left keys behind"
    else:
        assert valid is not None, f"the client took a job the contract refuses: {payload!r}"
        record = handle.status()
        assert record.status is JobStatus.queued and record.kind is JobKind(valid.kind)
        assert record.job == valid  # the record holds the job as the producer sent it
        client.redis.flushall()


def envelope_like(job_ids: list[str]) -> st.SearchStrategy[Any]:
    """Args a producer might send: broken envelopes (some naming real job ids) or plain junk."""
    job_id = st.sampled_from(job_ids) | st.text(max_size=8) | junk
    envelope = st.fixed_dictionaries({}, optional={
        "job_id": job_id, "submitted_at": st.sampled_from(["2024-01-01T00:00:00Z", "yesterday"]) | junk,
        "job": st.fixed_dictionaries({}, optional=job_fields) | junk, "schema_version": junk})
    return st.lists(envelope | junk, max_size=3)


def raw_messages(job_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    celery_v2 = st.builds(
        lambda args, kwargs, task: {"body": json.dumps([args, kwargs, {}]).encode(),
                                    "headers": {"task": task, "id": uuid.uuid4().hex, "lang": "py"},
                                    "content_type": "application/json"},
        envelope_like(job_ids), st.dictionaries(st.text(max_size=5), junk, max_size=2),
        st.sampled_from([TASK_RUN, TASK_RUN, "modelq.nope"]))
    no_headers = st.builds(lambda body: {"body": json.dumps(body).encode(), "headers": {},
                                         "content_type": "application/json"}, junk)
    not_json = st.builds(lambda raw: {"body": b"\xff{" + raw, "headers": {"task": TASK_RUN, "id": "x"},
                                      "content_type": "application/json"}, st.binary(max_size=20))
    pickled = st.just({"body": b"\x80\x04K\x01.", "headers": {"task": TASK_RUN, "id": "p"},
                       "content_type": "application/x-python-serialize"})
    return celery_v2 | no_headers | not_json | pickled


@pytest.mark.e2e
def test_raw_messages_on_the_queue_never_crash_a_worker_or_half_write_a_record(
        client: Client, pool: WorkerPool, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    worker = pool.start("w1")
    # The valid job goes to the shared queue too, behind the raw messages (FIFO).
    monkeypatch.setattr(client.registry, "queue_for", lambda job, route: SHARED_QUEUE)
    runs = {"n": 0}

    @settings(max_examples=4, deadline=None)
    @given(data=st.data())
    def batch(data: st.DataObject) -> None:
        runs["n"] += 1
        job_ids = [_queued_record(client) for _ in range(3)]
        messages = data.draw(st.lists(raw_messages(job_ids), min_size=10, max_size=15))
        with Connection(client.settings.redis_url) as conn:
            producer = conn.Producer()
            exchange = Exchange(SHARED_QUEUE, type="direct")
            for message in messages:
                producer.publish(message["body"], exchange=exchange, routing_key=SHARED_QUEUE,
                                 headers=message["headers"], content_type=message["content_type"],
                                 content_encoding="utf-8", serializer=None)
        # A valid job behind them: once it is done, the worker got through every message.
        dtype = ("float32", "bfloat16", "float16", "auto")[runs["n"] % 4]
        done = client.submit(LoadJob(model=ModelRef(path=str(models["llama"])), dtype=dtype)).wait(120)
        assert done.status is JobStatus.succeeded, done.error
        assert worker.alive()
        for job_id in job_ids:  # queued, failed as InvalidJob by a broken message naming it, never half-way
            status = client.status(job_id)
            assert status.status in (JobStatus.queued, JobStatus.failed)
            if status.status is JobStatus.failed:
                assert status.error is not None and status.error.type == "InvalidJob"
            client.store.delete(job_id, "default")

    batch()
    assert client.redis.llen(SHARED_QUEUE) == 0


def _queued_record(client: Client) -> str:
    job_id = uuid.uuid4().hex
    job = LoadJob(model=ModelRef(path="/nonexistent"))
    client.store.create(JobRecord(job_id=job_id, kind=JobKind.load, tenant="default",
                                  status=JobStatus.queued, created_at=now(), job=job))
    return job_id
