"""worker/recovery/rescue.py against a real Redis, on a fake clock: which lost jobs go back, and where."""

from __future__ import annotations

import json
import time
import uuid

import redis

from schemas import JobKind, JobRecord, JobStatus, LoadJob, ModelRef
from tasks.state.keys import UNACKED_HASH, UNACKED_INDEX, Keys
from tasks.state.store import Store, now
from worker.recovery.rescue import Redelivery, Resend

KEYS = Keys()
JOB = LoadJob(model=ModelRef(path="/models/tiny"))


def record(job_id: str, status: JobStatus = JobStatus.queued, worker: str | None = None,
           attempt: int = 0) -> JobRecord:
    return JobRecord(job_id=job_id, kind=JobKind.load, tenant=JOB.tenant, status=status,
                     created_at=now(), job=JOB, worker=worker, attempt=attempt)


def message(job_id: str) -> dict[str, object]:
    return {"body": "e30=", "headers": {"id": job_id, "task": "modelq.run"},
            "properties": {"delivery_info": {"exchange": "", "routing_key": "x"},
                           "body_encoding": "base64"}}


def taken(client: redis.Redis, job_id: str, queue: str, at: float,
          unacked: tuple[str, str] = (KEYS.unacked(), KEYS.unacked_index())) -> str:
    """An unacked entry as kombu writes it when a consumer takes a message off `queue`."""
    tag = uuid.uuid4().hex
    client.hset(unacked[0], tag, json.dumps([message(job_id), queue, queue]))
    client.zadd(unacked[1], {tag: at})
    return tag


def test_a_dead_workers_running_job_goes_back_once(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = Store(client, KEYS, 3600)
    lost, leased, young = (uuid.uuid4().hex for _ in range(3))
    for job_id in (lost, leased, young):
        store.create(record(job_id))
        client.set(KEYS.job(job_id), record(job_id, JobStatus.running, "gone", 1).model_dump_json())
    client.set(KEYS.lease(leased), "alive:1")
    start = time.time()
    taken(client, lost, "modelq.worker.gone", start - 60)
    taken(client, leased, "modelq", start - 60)
    taken(client, young, "modelq", start - 1)
    rescue = Redelivery(client, KEYS, worker_ttl=10, grace=30, clock=lambda: start)

    assert rescue.run() == 1
    waiting = [json.loads(m) for m in client.lrange("modelq", 0, -1)]
    assert [m["headers"]["id"] for m in waiting] == [lost]  # the dead worker's queue -> shared
    assert waiting[0]["headers"]["redelivered"] is True
    assert client.hlen(KEYS.unacked()) == 2 and client.zcard(KEYS.unacked_index()) == 2
    assert rescue.run() == 0  # the leased one runs; the young one's taker may be starting it

    client.set(KEYS.worker("gone"), "{}")  # a worker still registered is not dead
    client.delete(KEYS.lease(leased))
    client.set(KEYS.job(leased), record(leased, JobStatus.running, "gone", 1).model_dump_json())
    assert rescue.run() == 0


def test_a_queued_job_taken_and_never_started_goes_back_after_the_grace(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    job_id = uuid.uuid4().hex
    Store(client, KEYS, 3600).create(record(job_id))
    start = time.time()
    taken(client, job_id, "modelq", start - 20)
    assert Redelivery(client, KEYS, worker_ttl=10, grace=30, clock=lambda: start).run() == 0
    assert Redelivery(client, KEYS, worker_ttl=10, grace=30, clock=lambda: start + 11).run() == 1
    assert client.llen("modelq") == 1


def test_an_upgrade_loses_no_job_taken_into_kombus_global_hash(redis_url: str) -> None:
    """Workers before the unacked keys moved under the prefix wrote kombu's global hash: the
    rescue still restores this deployment's lost jobs from it, and leaves others' entries."""
    client = redis.Redis.from_url(redis_url)
    lost, foreign = uuid.uuid4().hex, uuid.uuid4().hex
    Store(client, KEYS, 3600).create(record(lost))
    client.set(KEYS.job(lost), record(lost, JobStatus.running, "gone", 1).model_dump_json())
    other = Keys("teamb")
    Store(client, other, 3600).create(record(foreign))
    client.set(other.job(foreign), record(foreign, JobStatus.running, "gone", 1).model_dump_json())
    start = time.time()
    for job_id, queue in ((lost, "modelq"), (foreign, "teamb")):
        taken(client, job_id, queue, start - 60, (UNACKED_HASH, UNACKED_INDEX))
    assert Resend(client, KEYS, lambda rec: "", grace=0, clock=lambda: start)._on_broker() >= {lost}

    assert Redelivery(client, KEYS, worker_ttl=10, grace=30, clock=lambda: start).run() == 1
    assert [json.loads(m)["headers"]["id"] for m in client.lrange("modelq", 0, -1)] == [lost]
    assert client.hlen(UNACKED_HASH) == 1 and not client.exists("teamb")  # B's entry left alone


def test_a_queued_job_with_no_message_is_sent_again_once(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = Store(client, KEYS, 3600)
    lost, waiting, running = (uuid.uuid4().hex for _ in range(3))
    for job_id in (lost, waiting, running):
        store.create(record(job_id))
    client.set(KEYS.job(running), record(running, JobStatus.running, "w1", 1).model_dump_json())
    client.lpush("modelq", json.dumps(message(waiting)))
    sent: list[JobRecord] = []

    def send(rec: JobRecord) -> str:
        sent.append(rec)
        return "modelq"

    clock = [time.time()]
    resend = Resend(client, KEYS, send, grace=30, clock=lambda: clock[0])
    assert resend.run() == 0  # younger than the grace: its submit may be sending it now
    clock[0] += 31
    assert resend.run() == 1
    assert [r.job_id for r in sent] == [lost] and sent[0].job == JOB  # the record's own job
    assert client.zscore(KEYS.unstarted(), running) is None  # started: pruned
    assert resend.run() == 0  # seen just now: looked at again after another grace


def test_a_long_backlog_is_not_read_whole_and_a_share_is_still_searched(redis_url: str) -> None:
    """The old queued jobs' messages sit at the taking end of the queues: Resend finds them
    there without a SCAN or a read of the whole backlog; one on a tenant share (not among the
    queues it reads first) is found by the full listing, so it is not sent twice."""
    client = redis.Redis.from_url(redis_url)
    store = Store(client, KEYS, 3600)
    old = [uuid.uuid4().hex for _ in range(3)]
    for job_id in old:
        store.create(record(job_id))
    client.lpush("modelq", *(json.dumps(message(job_id)) for job_id in old))  # taken first
    client.lpush("modelq", *(json.dumps(message(uuid.uuid4().hex)) for _ in range(3000)))
    sent: list[JobRecord] = []
    clock = [time.time() + 31]
    resend = Resend(client, KEYS, lambda rec: sent.append(rec) or "modelq", grace=30,
                    clock=lambda: clock[0])
    before = client.info("commandstats")
    assert resend.run() == 0 and sent == []
    after = client.info("commandstats")
    assert after.get("cmdstat_scan", {}).get("calls", 0) == before.get("cmdstat_scan", {}).get("calls", 0)
    read = after["cmdstat_lrange"]["calls"] - before.get("cmdstat_lrange", {}).get("calls", 0)
    assert read == 1  # one chunk of the shared queue's oldest messages

    shared = uuid.uuid4().hex
    store.create(record(shared))
    client.lpush(KEYS.tenant_queues("acme")[0], json.dumps(message(shared)))
    clock[0] += 61
    assert resend.run() == 0 and sent == []  # found on the share by the full listing
    assert client.info("commandstats")["cmdstat_scan"]["calls"] > 0
