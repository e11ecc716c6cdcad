"""Hardening: Redis AUTH with an ACL user and password; a pickled message is refused, never run."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from schemas import JobStatus, LoadJob
from tasks.client import Client
from tasks.settings import Settings
from tasks.state.keys import SHARED_QUEUE
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerPool

pytestmark = pytest.mark.e2e

PASSWORD = "acl-pass-0123456789"


class WritesMarker:
    """Unpickling this runs `exec`, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_acl_user_and_pickled_message(tmp_path: Path, models: dict[str, Path]) -> None:
    # the default user may only PING (so the harness can probe); everything else needs AUTH
    acl = ["--user", "default", "on", "nopass", "-@all", "+ping",
           "--user", "modelq", "on", f">{PASSWORD}", "~*", "&*", "+@all"]
    with RedisServer(extra_args=acl) as server:
        url = f"redis://modelq:{PASSWORD}@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.exceptions.NoPermissionError):
            server.client().get("anything")
        pool = WorkerPool(url, tmp_path)
        try:
            client = Client(Settings(redis_url=url, heartbeat_seconds=0.5, worker_ttl_seconds=3))
            marker = tmp_path / "pickle-marker"
            with Connection(url) as conn:
                Producer(conn).publish(
                    pickle.dumps(((WritesMarker(marker),), {}, {})), routing_key=SHARED_QUEUE,
                    exchange=Exchange(SHARED_QUEUE, type="direct"), serializer=None,
                    content_type="application/x-python-serialize", content_encoding="binary",
                    headers={"task": "modelq.run", "id": uuid.uuid4().hex, "lang": "py"},
                    declare=[Queue(SHARED_QUEUE, Exchange(SHARED_QUEUE, type="direct"),
                                   routing_key=SHARED_QUEUE)])
            assert client.redis.llen(SHARED_QUEUE) == 1  # waiting for the worker
            worker = pool.start("acl")
            record = client.submit(LoadJob(model=str(models["llama"]))).wait(timeout=120)
            assert record.status is JobStatus.succeeded, record.error  # served after the pickle
            assert not marker.exists() and worker.alive()
            assert client.redis.llen(SHARED_QUEUE) == 0  # taken (first in line) and dropped
            assert PASSWORD not in worker.log_text()
        finally:
            pool.stop_all()
