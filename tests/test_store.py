"""tasks/state/store.py against the real redis-server: transitions, terminal records, write
conflicts, revisions, event order and follow()."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

import pytest
import redis

from schemas import JobNotFound, JobRecord, JobStatus, LoadJob, Progress, Stage
from tasks.settings import Settings
from tasks.state.events import follow
from tasks.state.keys import Keys
from tasks.state.store import Store, now


@pytest.fixture
def store(settings: Settings) -> Store:
    return Store(redis.Redis.from_url(settings.redis_url), Keys(settings.key_prefix), 60)


def _new(store: Store, job_id: str = "j1") -> JobRecord:
    record = JobRecord(job_id=job_id, kind="load", tenant="t1", status=JobStatus.queued,
                       created_at=now(), job=LoadJob(model="o/m", tenant="t1"))
    store.create(record)
    return record


def test_create_get_and_refuse_duplicates(store: Store) -> None:
    record = _new(store)
    assert store.get("j1") == record
    assert store.redis.ttl(store.keys.job("j1")) > 0
    assert store.redis.zrange(store.keys.jobs("t1"), 0, -1) == [b"j1"]
    with pytest.raises(ValueError, match="already exists"):
        store.create(record)
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.transition("nope", JobStatus.running)


def test_transitions_stamp_times_and_events_come_in_order(store: Store) -> None:
    _new(store)
    running = store.transition("j1", JobStatus.running, worker="w1", device="cpu", attempt=1,
                               message="started")
    assert running is not None and running.started_at is not None and running.worker == "w1"
    store.report("j1", Stage.resolving, message="resolving")
    store.report("j1", Stage.loading, Progress(fraction=0.5, done=5, total=10))
    done = store.transition("j1", JobStatus.succeeded, message="done")
    assert done is not None and done.finished_at is not None and done.finished_at.tzinfo == UTC
    assert done.stage is Stage.loading and done.started_at == running.started_at

    events = [e for _, e in store.events("j1")]
    assert [(e.status.value, e.stage and e.stage.value, e.message) for e in events] == [
        ("queued", None, "submitted"), ("running", None, "started"),
        ("running", "resolving", "resolving"), ("running", "loading", None),
        ("succeeded", "loading", "done")]
    assert events[3].progress == Progress(fraction=0.5, done=5, total=10)
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert store.redis.ttl(store.keys.events("j1")) > 0


@pytest.mark.parametrize("final", [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled])
def test_terminal_records_never_change(store: Store, final: JobStatus) -> None:
    _new(store)
    store.request_cancel("j1")
    ended = store.transition("j1", final)
    assert ended is not None and not store.cancel_requested("j1")
    raw = store.redis.get(store.keys.job("j1"))
    count = store.redis.xlen(store.keys.events("j1"))
    for status in JobStatus:
        assert store.transition("j1", status, worker="late") is None
    assert store.report("j1", Stage.loading) is None
    assert store.redis.get(store.keys.job("j1")) == raw
    assert store.redis.xlen(store.keys.events("j1")) == count


def test_report_only_while_running_and_only_from(store: Store) -> None:
    _new(store)
    assert store.report("j1", Stage.loading) is None  # still queued
    assert store.transition("j1", JobStatus.running, only_from=frozenset({JobStatus.retrying})) is None
    assert store.get("j1").status is JobStatus.queued


@pytest.mark.parametrize("race", ["after_our_last_write", "between_watch_and_exec"])
def test_a_conflicting_write_is_never_overwritten(store: Store, settings: Settings, race: str) -> None:
    """A worker's update races a cancel from another client: the cancel wins, nothing is lost.

    'after_our_last_write' goes through the one-round-trip compare-and-set (the store
    remembers what it wrote); 'between_watch_and_exec' through the fallback that reads the
    record and retries the compare-and-set (the other write lands between read and write).
    """
    _new(store)
    store.transition("j1", JobStatus.running, worker="w1")
    other = Store(redis.Redis.from_url(settings.redis_url), store.keys, 60)
    if race == "after_our_last_write":
        other.transition("j1", JobStatus.cancelled, message="cancel from elsewhere")
    else:
        store._seen.clear()
        original = store._next
        calls: list[str] = []

        def next_after_a_cancel(*args: Any) -> Any:
            outcome = original(*args)
            if not calls:  # we read under WATCH; another client cancels before our EXEC
                calls.append("cancel")
                other.transition("j1", JobStatus.cancelled, message="cancel from elsewhere")
            return outcome

        store._next = next_after_a_cancel  # type: ignore[method-assign]
    assert store.report("j1", Stage.loading, message="late progress") is None
    record = store.get("j1")
    assert record.status is JobStatus.cancelled and record.stage is None
    messages = [e.message for _, e in store.events("j1")]
    assert messages[-1] == "cancel from elsewhere" and "late progress" not in messages


def test_concurrent_writers_end_in_one_terminal_state(store: Store, settings: Settings) -> None:
    _new(store)
    store.transition("j1", JobStatus.running)
    finals = [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled] * 2
    results: list[JobRecord | None] = []

    def write(status: JobStatus) -> None:
        mine = Store(redis.Redis.from_url(settings.redis_url), store.keys, 60)
        for i in range(10):
            mine.report("j1", Stage.loading, Progress(fraction=i / 10))
        results.append(mine.transition("j1", status))

    threads = [threading.Thread(target=write, args=(s,)) for s in finals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert store.get("j1") == winners[0]
    statuses = [e.status for _, e in store.events("j1")]
    assert statuses[-1] == winners[0].status
    assert sum(s in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled) for s in statuses) == 1


def test_follow_yields_from_the_start_until_the_terminal_event(store: Store) -> None:
    _new(store)
    store.transition("j1", JobStatus.running)

    def finish() -> None:
        store.report("j1", Stage.loading)
        store.transition("j1", JobStatus.failed, message="boom")
        store.redis.xadd(store.keys.events("j1"), {"event": "never read"})

    timer = threading.Timer(0.3, finish)
    timer.start()
    seen = [(e.status.value, e.message) for e in follow(store, "j1", timeout=30, poll_ms=100)]
    timer.join()
    assert seen == [("queued", "submitted"), ("running", None), ("running", None), ("failed", "boom")]


def test_follow_reads_the_last_events_of_a_job_that_ends_between_its_reads(store: Store) -> None:
    """The race behind a follower that stopped after `queued, running`: its read waits out with
    nothing, the job ends, then the follower sees the terminal record. It must still yield the
    events written with that record (here the job ends exactly inside the empty read)."""
    _new(store)
    store.transition("j1", JobStatus.running)
    read = store.events
    empty_reads: list[str] = []

    def read_then_end(job_id: str, after: str = "0-0", block_ms: int | None = None) -> Any:
        batch = read(job_id, after=after, block_ms=block_ms)
        if not batch and not empty_reads:
            empty_reads.append(after)
            store.report("j1", Stage.loading)
            store.transition("j1", JobStatus.failed, message="boom")
        return batch

    store.events = read_then_end  # type: ignore[method-assign]
    seen = [(e.status.value, e.message) for e in follow(store, "j1", timeout=30, poll_ms=50)]
    assert empty_reads, "the follower never waited out an empty read"
    assert seen == [("queued", "submitted"), ("running", None), ("running", None), ("failed", "boom")]


def test_follow_stops_at_its_timeout_and_on_a_terminal_record(store: Store) -> None:
    _new(store)
    started = time.monotonic()
    assert [e.status for e in follow(store, "j1", timeout=0.3, poll_ms=50)] == [JobStatus.queued]
    assert time.monotonic() - started < 5
    store.transition("j1", JobStatus.cancelled)
    store.redis.delete(store.keys.events("j1"))  # events expired: the record still ends it
    assert list(follow(store, "j1", timeout=10, poll_ms=50)) == []


def test_a_malformed_event_is_skipped_not_fatal(store: Store) -> None:
    """A stream entry modelq didn't write (another producer, a bad tool) never stops a reader."""
    _new(store)
    store.redis.xadd(store.keys.events("j1"), {"event": "not json"})
    store.redis.xadd(store.keys.events("j1"), {"other": "field"})
    store.transition("j1", JobStatus.cancelled, message="stop")
    assert [(e.status.value, e.message) for e in follow(store, "j1", timeout=10)] == [
        ("queued", "submitted"), ("cancelled", "stop")]


def test_final_write_releases_pairs_that_still_hold_their_values(store: Store) -> None:
    _new(store)
    store.redis.set("lease", "w1:7")
    store.redis.set("claim", "modelq.worker.w2")  # taken over by another worker meanwhile
    store.transition("j1", JobStatus.running, worker="w1")  # CAS path: this store saw the record
    done = store.transition("j1", JobStatus.succeeded, release=[("lease", "w1:7"),
                                                                ("claim", "modelq.worker.w1")])
    assert done is not None and done.status is JobStatus.succeeded
    assert store.redis.get("lease") is None and store.redis.get("claim") == b"modelq.worker.w2"


def test_release_pairs_also_go_with_the_watch_path_and_not_with_a_refused_write(store: Store) -> None:
    _new(store)
    store.redis.set("lease", "w1:7")
    other = Store(store.redis, store.keys, 60)  # never saw the record: reads it under WATCH
    assert other.transition("j1", JobStatus.succeeded, release=[("lease", "w1:7")]) is not None
    assert store.redis.get("lease") is None
    store.redis.set("lease", "w1:7")
    assert other.transition("j1", JobStatus.failed, release=[("lease", "w1:7")]) is None  # terminal
    assert store.redis.get("lease") == b"w1:7"
    store.release([("lease", "w1:8"), ("nothing", "x")])  # not ours: kept
    assert store.redis.get("lease") == b"w1:7"
    store.release([("lease", "w1:7")])
    assert store.redis.get("lease") is None


def test_create_indexes_open_jobs_only_when_asked(store: Store) -> None:
    _new(store, "j1")
    record = JobRecord(job_id="j2", kind="load", tenant="t1", status=JobStatus.queued,
                       created_at=now(), job=LoadJob(model="o/m", tenant="t1"))
    store.create(record, open_jobs=True)
    assert store.redis.zrange(store.keys.open_jobs("t1"), 0, -1) == [b"j2"]
    assert store.redis.zrange(store.keys.jobs("t1"), 0, -1) == [b"j1", b"j2"]
    assert [(e.status, e.message) for _, e in store.events("j2")] == [(JobStatus.queued, "submitted")]


def test_start_takes_the_lease_and_starts_a_record_still_as_submitted(store: Store) -> None:
    record = _new(store)
    lease = ("lease", "w1:7", 5000)
    started = store.start(record, lease, message="started on w1", worker="w1", attempt=1)
    assert started.holder == "w1:7" and started.current is None and not started.cancel
    assert started.record is not None and started.record == store.get("j1")
    assert started.record.status is JobStatus.running and started.record.attempt == 1
    assert 0 < store.redis.pttl("lease") <= 5000
    # another worker: the lease is taken, nothing is written, it sees the record as stored
    other = store.start(record, ("lease", "w2:9", 5000), message="started on w2", worker="w2")
    assert other.holder == "w1:7" and other.record is None
    assert other.current is not None and JobRecord.model_validate_json(other.current).worker == "w1"
    assert [e.message for _, e in store.events("j1")] == ["submitted", "started on w1"]


def test_start_leaves_a_changed_record_to_the_caller(store: Store) -> None:
    record = _new(store)
    store.request_cancel("j1")
    store.transition("j1", JobStatus.cancelled)
    started = store.start(record, ("lease", "w1:7", 5000), message="started", worker="w1")
    assert started.holder == "w1:7" and started.record is None and started.cancel is False
    assert started.current is not None
    assert JobRecord.model_validate_json(started.current).status is JobStatus.cancelled
    again = _new(store, "j2")
    store.request_cancel("j2")  # a running attempt's flag, seen by the next attempt
    assert store.start(again, ("lease2", "w1:7", 5000), message="started").cancel


def test_run_through_starts_and_ends_a_submitted_job_in_one_write(store: Store) -> None:
    record = _new(store)
    store.redis.set("claim", "q.w1")
    final = store.run_through(record, lease="lease",
                              started=("started on w1", {"worker": "w1", "attempt": 1}),
                              ended=("done", {}), release=[("claim", "q.w1")])
    assert final is not None and final == store.get("j1") and final.status is JobStatus.succeeded
    assert final.started_at is not None and final.finished_at is not None and final.attempt == 1
    assert [(e.status, e.message) for _, e in store.events("j1")] == [
        (JobStatus.queued, "submitted"), (JobStatus.running, "started on w1"),
        (JobStatus.succeeded, "done")]
    assert store.ended("j1", block_ms=1) == final and store.redis.get("claim") is None
    # already ended, or leased by a worker running it: nothing is written
    assert store.run_through(record, lease="lease", started=("x", {}), ended=("x", {})) is None
    other = _new(store, "j2")
    store.redis.set("lease2", "w2:1")
    assert store.run_through(other, lease="lease2", started=("x", {}), ended=("x", {})) is None
    assert store.get("j2").status is JobStatus.queued


def _commands(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The commands `store` sends from now on (each one round trip)."""
    sent: list[str] = []
    original: Callable[..., Any] = store.redis.execute_command

    def execute_command(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return original(*args, **options)

    monkeypatch.setattr(store.redis, "execute_command", execute_command)
    return sent


def test_start_compares_revisions_not_bytes(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record the producer rendered differently (another pydantic: keys in another order,
    whitespace) is still as submitted: the worker starts it in one script."""
    record = _new(store)
    key = store.keys.job("j1")
    stored = json.loads(store.redis.get(key) or b"")
    store.redis.set(key, json.dumps(dict(reversed(stored.items())), indent=2), keepttl=True)
    assert store.redis.get(key) != record.model_dump_json().encode()
    sent = _commands(store, monkeypatch)
    started = store.start(record, ("lease", "w1:7", 5000), message="started", worker="w1", attempt=1)
    assert sent == ["EVALSHA"] and started.record is not None and started.current is None
    assert started.record == store.get("j1") and started.record.status is JobStatus.running
    assert started.revision == 2
    sent.clear()
    assert store.report("j1", Stage.loading) is not None and sent == ["EVALSHA"]


def test_a_later_attempt_adopts_the_record_start_returned(store: Store,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    record = _new(store)
    store.transition("j1", JobStatus.retrying)
    worker = Store(store.redis, store.keys, 60)
    started = worker.start(record, ("lease", "w1:7", 5000), message="started", worker="w1")
    assert started.record is None and started.current is not None and started.revision == 2
    assert worker.adopt("j1", started.current).status is JobStatus.retrying
    sent = _commands(worker, monkeypatch)
    running = worker.transition("j1", JobStatus.running, only_from=frozenset({JobStatus.retrying}))
    assert running is not None and sent == ["EVALSHA"]  # the revision came with the record


def test_a_record_older_than_revisions_still_changes(store: Store) -> None:
    record = _new(store)
    store.redis.delete(store.keys.revision("j1"))  # written before revisions existed
    assert store.get("j1") == record  # remembered at revision 0
    other = Store(store.redis, store.keys, 60)
    assert other.start(record, ("lease", "w1:7", 5000), message="started").record is None
    running = other.transition("j1", JobStatus.running, worker="w1")
    assert running is not None and store.redis.get(store.keys.revision("j1")) == b"1"
    assert store.transition("j1", JobStatus.succeeded) is not None  # stale view: read, then set
    assert store.get("j1").status is JobStatus.succeeded


def test_a_deleted_record_is_not_written_back(store: Store) -> None:
    _new(store)
    store.transition("j1", JobStatus.running)
    store.delete("j1", "t1")
    with pytest.raises(JobNotFound):
        store.transition("j1", JobStatus.failed)
    assert store.redis.get(store.keys.job("j1")) is None
