"""The gateway under 500 event-stream followers: `/healthz` and a submit still answer in well
under a second. `modelq gateway` runs as a subprocess on 127.0.0.1 against the test Redis; no
worker, so the followed load job stays queued and its stream never ends. Only loopback traffic;
the followers are bounded in count and time and stop by themselves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_gateway import _free_port

ROOT = Path(__file__).resolve().parent.parent
FOLLOWERS = int(os.environ.get("MODELQ_TEST_FOLLOWERS", "500"))
LOAD = {"model": {"repo_id": "org/model"}}
PROBES = 5


@pytest.fixture
def gateway_url(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """`modelq gateway` in a subprocess; checks the line it prints about where it listens."""
    port = _free_port()
    env = {**os.environ, "MODELQ_REDIS_URL": redis_url, "MODELQ_HOME": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}
    env.pop("MODELQ_TENANTS_FILE", None)
    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "gateway", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert log.read_text().splitlines()[0] == \
            f"modelq gateway on {url} (OpenAPI at /docs); no API keys (single tenant)"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def _follow(http: httpx.AsyncClient, job_id: str, connected: list[int], stop: asyncio.Event) -> None:
    """Follow the job's events until its first event arrives, then hold on until `stop`."""
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                connected.append(1)
                await stop.wait()
                return


async def _timed(call: Awaitable[httpx.Response]) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = await call
    return time.perf_counter() - start, response


async def _under_load(url: str) -> dict[str, list[float]]:
    limits = httpx.Limits(max_connections=FOLLOWERS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http, \
            httpx.AsyncClient(base_url=url, timeout=30) as probe:
        job = (await http.post("/v1/jobs/load", json=LOAD)).json()  # a queued job: never ends
        stop, connected = asyncio.Event(), []
        followers = [asyncio.create_task(_follow(http, job["job_id"], connected, stop))
                     for _ in range(FOLLOWERS)]
        try:
            deadline = time.monotonic() + 90
            while len(connected) < FOLLOWERS:
                failed = [t for t in followers if t.done()]
                assert not failed, failed[0].result()
                assert time.monotonic() < deadline, f"{len(connected)} of {FOLLOWERS} followers connected"
                await asyncio.sleep(0.1)
            timings: dict[str, list[float]] = {"healthz": [], "submit": []}
            for _ in range(PROBES):
                took, response = await _timed(probe.get("/healthz"))
                assert response.status_code == 200, response.text
                timings["healthz"].append(took)
                took, response = await _timed(probe.post("/v1/jobs/load", json=LOAD))
                assert response.status_code == 202, response.text
                timings["submit"].append(took)
            assert len(connected) == FOLLOWERS and not any(t.done() for t in followers)
            return timings
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*followers, return_exceptions=True), 60)


def test_health_and_submit_answer_at_once_under_500_followers(gateway_url: str) -> None:
    timings = asyncio.run(_under_load(gateway_url))
    print(f"\n{FOLLOWERS} followers: " + ", ".join(
        f"{name} max {max(values) * 1000:.0f} ms, median {sorted(values)[len(values) // 2] * 1000:.0f} ms"
        for name, values in timings.items()))
    assert max(timings["healthz"]) < 1.0, timings
    assert max(timings["submit"]) < 1.0, timings
