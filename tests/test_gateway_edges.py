"""The gateway's edges on a real Redis: one error shape for every status (the framework's own
refusals too), bounded bodies, the published contract, and the async event stream's resume."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis
import redis.asyncio
from fastapi.testclient import TestClient

from schemas import JobRecord, JobStatus, LoadJob
from tasks.gateway.api import create_gateway
from tasks.gateway.events import EventStreams
from tasks.gateway.http import MAX_JSON_DEPTH
from tasks.settings import Settings
from tasks.state.keys import Keys
from tasks.state.store import Store, now
from tests.test_gateway import error_of

LOAD = {"model": {"repo_id": "org/model"}}


@pytest.fixture
def http(settings: Settings) -> TestClient:
    return TestClient(create_gateway(settings.model_copy(update={"max_body_bytes": 4096})),
                      raise_server_exceptions=False)


def test_framework_refusals_come_in_the_one_shape(http: TestClient) -> None:
    assert error_of(http.get("/v1/nope"), 404)["type"] == "RouteNotFound"
    wrong = http.delete("/v1/jobs/load")
    assert error_of(wrong, 405)["type"] == "MethodNotAllowed" and wrong.headers["allow"] == "POST"
    assert error_of(http.get("/v1/jobs/x/events", headers={"Last-Event-ID": "not-an-id"}), 422)["type"] \
        == "InvalidRequest"


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"not json", 400, "not JSON"),
    (b'{"model": "\xff\xfe"}', 400, "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, 413, "over the gateway's limit"),  # over 4096 bytes: never parsed
    (b"[" * 2000 + b"]" * 2000, 400, "nests"),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), 400, "nests"),
    (b"[1, 2]", 422, "a job is a JSON object"),
    (b'{"model": {"repo_id": "org/model"}, "pin": "' + b"x" * 5000 + b'"}', 413, "MODELQ_MAX_BODY_BYTES"),
])
def test_bodies_are_bounded_and_refused_in_the_one_shape(http: TestClient, body: bytes, status: int,
                                                         words: str) -> None:
    error = error_of(http.post("/v1/jobs/load", content=body,
                               headers={"content-type": "application/json"}), status)
    assert words in error["message"] and error["retryable"] is False


def test_a_streamed_body_is_cut_off_at_the_limit(http: TestClient) -> None:
    def chunks() -> Any:  # no Content-Length: chunked, counted as it arrives
        yield json.dumps(LOAD)[:-1].encode() + b', "pin": false'
        for _ in range(100):
            yield b" " * 1024
        yield b"}"
    assert error_of(http.post("/v1/jobs/load", content=chunks()), 413)["type"] == "BodyTooLarge"
    assert http.post("/v1/jobs/load", json=LOAD).status_code == 202


def test_openapi_documents_the_job_bodies_and_every_error(http: TestClient) -> None:
    doc = http.get("/openapi.json").json()
    body = doc["paths"]["/v1/jobs/load"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    loaded = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"model", "quantization", "adapters"} <= set(loaded["properties"])
    union = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(union["discriminator"]["mapping"]) == {"load", "attach", "unload", "run"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            errors = {s: r for s, r in operation["responses"].items() if s >= "400"}
            assert "500" in errors and "503" in errors, (method, path)
            for status, response in errors.items():
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
    assert {"400", "413", "422", "429"} <= set(doc["paths"]["/v1/jobs/run"]["post"]["responses"])
    assert "HTTPValidationError" not in json.dumps(doc)


def test_events_stream_asynchronously_and_resume(http: TestClient) -> None:
    job = http.post("/v1/jobs", json={"kind": "load", **LOAD}).json()
    assert http.post(f"/v1/jobs/{job['job_id']}/cancel").json()["status"] == "cancelled"
    stream = http.get(f"/v1/jobs/{job['job_id']}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    ids = [line[4:] for line in stream.text.splitlines() if line.startswith("id: ")]
    assert [line[7:] for line in stream.text.splitlines() if line.startswith("event: ")] \
        == ["queued", "cancelled"]
    resumed = http.get(f"/v1/jobs/{job['job_id']}/events", headers={"Last-Event-ID": ids[0]})
    assert resumed.text.count("\ndata: ") == 1 and f"id: {ids[1]}" in resumed.text
    assert error_of(http.get("/v1/jobs/nope/events"), 404)["type"] == "JobNotFound"


def test_bodies_are_held_to_the_documented_json_types(http: TestClient) -> None:
    lenient = error_of(http.post("/v1/jobs/load", json={**LOAD, "pin": 0}), 422)
    assert lenient["type"] == "InvalidJob"
    assert "pin" in lenient["message"] and "boolean" in lenient["message"]  # 0 is no JSON boolean
    assert http.post("/v1/jobs/load", json={"model": "org/model", "adapters": ["org/adapter"]}).status_code \
        == 202  # the documented string forms
    gone = error_of(http.post("/v1/jobs/attach", json={"model_key": "a" * 32, "adapter": "/tmp/lora"}), 404)
    assert gone["type"] == "ModelNotFound"


def test_an_event_stream_reads_the_last_events_of_a_job_that_ends_between_its_reads(
        settings: Settings) -> None:
    """The follower's race on the gateway side: a read waits out with nothing, the job ends
    inside it, the record says terminal; the stream must still send the terminal event."""
    store = Store(redis.Redis.from_url(settings.redis_url), Keys(settings.key_prefix), 60)
    store.create(JobRecord(job_id="j1", kind="load", tenant="t1", status=JobStatus.queued,
                           created_at=now(), job=LoadJob(model="o/m", tenant="t1")))
    streams = EventStreams(lambda: redis.asyncio.Redis.from_url(settings.redis_url),
                           Keys(settings.key_prefix), keepalive_ms=50)
    read = streams._read
    empty_reads: list[str] = []

    async def read_then_end(job_id: str, after: str, *block_ms: int | None) -> Any:
        batch = await read(job_id, after, *block_ms)
        if not batch and not empty_reads:
            empty_reads.append(after)
            store.transition("j1", JobStatus.failed, message="boom")
        return batch

    streams._read = read_then_end  # type: ignore[method-assign]

    async def messages() -> list[str]:
        return [message async for message in streams.sse("j1", "0-0")]

    sent = "".join(asyncio.run(messages()))
    assert empty_reads, "the stream never waited out an empty read"
    assert [line[7:] for line in sent.splitlines() if line.startswith("event: ")] == ["queued", "failed"]
