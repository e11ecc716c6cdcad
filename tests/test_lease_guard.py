"""worker/jobs/lease.py against the real redis-server, and worker/jobs/guard.py's stage and cancel checks."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from schemas import Cancelled, LoadJob, Stage
from tasks.settings import Settings
from tasks.state.keys import Keys
from worker.fault_hooks import Faults
from worker.jobs.guard import CANCEL_POLL_SECONDS, GuardHooks, JobGuard, Opened, Watchdog
from worker.jobs.lease import Leases


@pytest.fixture
def client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def test_a_lease_is_renewed_while_held_and_not_after(client: redis.Redis) -> None:
    keys = Keys()
    leases = Leases(client, keys, worker="a", ttl=5)
    key, token, ttl_ms = leases.lease("j1")
    assert (key, ttl_ms) == (keys.lease("j1"), 5000) and leases.pair("j1") == (key, token)
    client.set(key, token, px=1000)  # taken by the start script
    leases.hold("j1")
    leases.renew()
    assert client.pttl(key) > 1000 and leases.held() == ["j1"]
    leases.forget("j1")  # the final record took the lease along: stop renewing it
    client.set(key, token, px=1000)
    leases.renew()
    assert client.pttl(key) <= 1000 and leases.held() == []


def _guard(reports: list[tuple[Stage, float | None]], *, asked: list[bool], clock: list[float],
           opened: Opened | None = None) -> JobGuard:
    hooks = GuardHooks(report=lambda stage, progress, message, metrics: reports.append(
                           (stage, progress.fraction if progress else None)),
                       cancel_requested=lambda: asked[0])
    return JobGuard("j1", LoadJob(model="o/m"), timeout=60, hooks=hooks, faults=Faults(),
                    clock=lambda: clock[0], opened=opened or Opened())


def test_the_announced_opening_stage_is_not_written_twice() -> None:
    reports: list[tuple[Stage, float | None]] = []
    guard = _guard(reports, asked=[False], clock=[0.0], opened=Opened(stage=Stage.resolving))
    guard.reporter.stage(Stage.resolving)  # written with the job's start already
    guard.reporter.progress(10, 10)  # progress in it is news
    guard.reporter.stage(Stage.loading)
    guard.reporter.stage(Stage.resolving)  # a second time is news
    assert reports == [(Stage.resolving, 1.0), (Stage.loading, 0.0), (Stage.resolving, 0.0)]


def test_a_cancel_flag_read_with_the_lease_counts_as_the_first_look() -> None:
    asked, clock = [False], [0.0]
    guard = _guard([], asked=asked, clock=clock, opened=Opened(cancel=False))
    asked[0] = True
    assert not guard.cancelled()  # seen clear at start: no second read within the poll interval
    clock[0] = CANCEL_POLL_SECONDS
    assert guard.cancelled()
    seen = _guard([], asked=[False], clock=[0.0], opened=Opened(cancel=True))
    with pytest.raises(Cancelled):
        seen.check()


def test_the_watchdog_fires_only_for_a_job_still_running_past_its_deadline() -> None:
    watchdog, fired = Watchdog(grace=0.05), threading.Event()
    watchdog.watch("ended", time.monotonic(), fired.set)
    watchdog.clear("ended")  # it ended in time: nothing happens
    watchdog.watch("next", time.monotonic() + 60, fired.set)
    watchdog.clear("other")  # not the watched job: no effect
    watchdog.watch("stuck", time.monotonic() + 0.05, fired.set)
    assert not fired.wait(0.05)
    assert fired.wait(2)
