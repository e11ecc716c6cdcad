"""A body over the gateway's limit is answered 413, and the client reads that answer: the gateway
reads and discards the rest of the body (bounded in bytes and time, like nginx's lingering
close) before it closes, instead of closing while the client is still sending, which a Python
client (urllib, requests) saw as `Connection reset by peer`. A real uvicorn on loopback, default
settings; plain urllib and http.client as clients, 20 MB bodies."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn

from tasks.gateway import http as gateway_http
from tasks.gateway.api import create_gateway
from tasks.gateway.http import DRAIN_BYTES, drain
from tasks.settings import Settings
from tests.test_gateway import _free_port

BODY = b'{"model": "org/model", "tenant": "' + b"x" * (20 * 10**6) + b'"}'  # 20 MB of one JSON job


@pytest.fixture
def gateway(redis_url: str) -> Iterator[tuple[str, int]]:
    """The gateway under uvicorn in a thread, on defaults but for Redis."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_gateway(Settings(redis_url=redis_url)), host="127.0.0.1",
                                           port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(10)


def _refusal(status: int, body: bytes) -> dict[str, object]:
    assert status == 413, body[:200]
    error: dict[str, object] = json.loads(body)["error"]
    assert error["type"] == "BodyTooLarge" and "MODELQ_MAX_BODY_BYTES" in str(error["message"])
    return error


def test_urllib_reads_the_413_of_a_20_mb_body(gateway: tuple[str, int]) -> None:
    host, port = gateway
    request = urllib.request.Request(f"http://{host}:{port}/v1/jobs/load", data=BODY,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    _refusal(refused.value.code, refused.value.read())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_http_client_reads_the_413_then_the_connection_closes(gateway: tuple[str, int],
                                                               chunked: bool) -> None:
    host, port = gateway
    connection = http.client.HTTPConnection(host, port, timeout=60)
    chunks = (BODY[i:i + 65536] for i in range(0, len(BODY), 65536))
    connection.request("POST", "/v1/jobs", body=chunks if chunked else BODY, encode_chunked=chunked,
                       headers={"Content-Type": "application/json",
                                **({} if chunked else {"Content-Length": str(len(BODY))})})
    response = connection.getresponse()
    _refusal(response.status, response.read())
    assert response.getheader("Connection") == "close"
    connection.close()


def test_a_client_that_expects_100_continue_gets_the_413_without_sending(gateway: tuple[str, int]) -> None:
    with socket.create_connection(gateway, timeout=30) as sock:
        sock.sendall(b"POST /v1/jobs/load HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20000000\r\nExpect: 100-continue\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in head
    _refusal(413, body)


def test_draining_stops_at_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []

    async def endless(pause: float) -> AsyncIterator[bytes]:
        while True:
            read.append(1)
            await asyncio.sleep(pause)
            yield b"x" * 65536

    asyncio.run(drain(endless(0)))
    assert len(read) == DRAIN_BYTES // 65536 + 1  # one chunk past the bound, then it stops
    monkeypatch.setattr(gateway_http, "DRAIN_SECONDS", 0.2)
    started = time.monotonic()
    asyncio.run(drain(endless(60)))  # a client that stalls: given up on after DRAIN_SECONDS
    assert time.monotonic() - started < 5
