"""Simulated workers for `python -m bench.scale`: many real heartbeats in one process, no torch.

`python -m bench.scale_sim CONFIG.json` registers one `worker.recovery.heartbeat.Heartbeat` per
name in the config (the real class, against the real Redis), each describing a stub
cache of four resident models (a ~1.5 KB entry, as a worker holding four models writes)
and the built-in task names, and each with its own real `worker.recovery.reaper.Reaper` (with the
rescue sweeps a real worker runs) on its beats. A few scheduler threads beat every
worker once per heartbeat interval, staggered, instead of a thread per worker. Nothing
here consumes a queue: the bench's real `modelq worker` processes do that.

The process lowers its own CPU priority first (`os.nice(config["nice"])`, 10 by default):
it stands in for other machines, whose Python would not compete for the bench machine's
cores with the producer being timed, the consumers and Redis. Its beats still reach Redis,
and cost it, as a real pool's do; `stats` reports how late they ran (at nice 19 they ran
up to 17 s late on a saturated 2-core machine, the pool lapsing: not a pool any more).

Control is one line at a time on stdin, each answered with one JSON line on stdout:
`pause` (no beat in flight when it answers), `resume`, `kill NAME` (that worker's beats
stop, as if its process died: its entry lapses after the TTL; the answer holds the wall
time of its last beat), `stats`, `quit` (the live ones leave the registry).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas import ResidentModel
from tasks.settings import Settings
from tasks.state.connection import connect
from tasks.state.keys import Keys
from tasks.tenants import load_tenants
from worker.recovery.heartbeat import Heartbeat, WorkerState
from worker.recovery.reaper import Reaper, reap_every
from worker.recovery.rescue import Redelivery, Resend, celery_send

log = logging.getLogger("bench.scale_sim")

BUILTIN_TASKS = ("modelq.add_adapter", "modelq.generate", "modelq.loglikelihood",
                 "modelq.save_adapter", "modelq.train_adapter")
CAPACITY = 80 * 1024**3  # an 80 GB accelerator
MODEL_BYTES = 15 * 1024**3  # four 7B bf16 models resident


def _hex(*parts: object, size: int = 64) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:size]


def stub_models(name: str, serves: str | None = None) -> list[ResidentModel]:
    """Four resident models as a real worker lists them (`serves`: a request key the first one
    answers, so the bench can route loads to this worker)."""
    at = datetime.now(UTC)
    models = []
    for i in range(4):
        key = serves if i == 0 and serves is not None else _hex(name, i, "request", size=32)
        models.append(ResidentModel(
            model_key=_hex(name, i), tenant="acme", bytes=MODEL_BYTES,
            base=f"meta-llama/Llama-2-7b-hf@{_hex(name, i, 'revision', size=40)}",
            adapters=(f"support-{i}",), active_adapters=(f"support-{i}",),
            last_used=at, request_keys=(key,)))
    return models


@dataclass
class SimWorker:
    """One simulated worker: its real heartbeat and reaper, and when it beats next."""

    heartbeat: Heartbeat
    on_beat: Callable[[], int]
    due: float
    alive: bool = True
    last_beat: float = 0.0  # wall time of its last beat
    lock: threading.Lock = field(default_factory=threading.Lock)


def beat(worker: SimWorker, side: ThreadPoolExecutor) -> None:
    """One beat through whichever heartbeat API this checkout has: `Heartbeat.beat()` (entry,
    indexes and on_beat in one call) if present, else `publish()` with the reaper's turn
    handed to `side` (threads of its own, so that one slow reap, a SCAN of the keyspace, does
    not hold up the beats of every worker this thread serves)."""
    one = getattr(worker.heartbeat, "beat", None)
    if callable(one):
        one()
    else:
        worker.heartbeat.publish()
        side.submit(_quiet, worker.on_beat)
    worker.last_beat = time.time()


def _quiet(call: Callable[[], int]) -> None:
    try:
        call()
    except Exception:  # a beat must never die, as in worker/recovery/heartbeat.py
        log.exception("reaper turn failed")


class Host:
    """The simulated workers of this process and the threads that beat them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.settings = Settings(redis_url=config["redis_url"],
                                 heartbeat_seconds=config["interval"],
                                 worker_ttl_seconds=config["ttl"], connect_timeout_seconds=10,
                                 command_timeout_seconds=60)
        self.redis = connect(self.settings)
        self.keys = Keys(self.settings.key_prefix)
        send = celery_send(self.settings, load_tenants(None))
        interval, names = config["interval"], config["names"]
        victims: dict[str, str] = config.get("victims", {})
        start = time.monotonic()
        self.workers: dict[str, SimWorker] = {}
        for i, name in enumerate(names):
            self.workers[name] = self._worker(name, victims.get(name), send,
                                              start + interval * i / max(1, len(names)))
        self.cond = threading.Condition()
        self.paused = False
        self.in_flight = 0
        self.stopping = False
        self.late: list[float] = []  # seconds each beat ran after it was due
        self.side = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sim-reaper")
        threads = max(1, min(config.get("threads", 4), len(names)))
        slices = [list(self.workers.values())[t::threads] for t in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in slices]

    def _worker(self, name: str, serves: str | None, send: Any, due: float) -> SimWorker:
        models = stub_models(name, serves)
        state = WorkerState(CAPACITY, CAPACITY - sum(m.bytes for m in models), models, BUILTIN_TASKS)
        settings, grace = self.settings, self.settings.lost_job_grace_seconds
        reaper = Reaper(self.redis, self.keys, every=reap_every(settings.worker_ttl_seconds), worker=name,
                        sweeps=[Redelivery(self.redis, self.keys, worker_ttl=settings.worker_ttl_seconds,
                                           grace=grace).run,
                                Resend(self.redis, self.keys, send, grace=grace).run])
        heartbeat = Heartbeat(self.redis, self.keys, (name, "cuda:0"), state=lambda: state,
                              timing=(settings.heartbeat_seconds, settings.worker_ttl_seconds))
        if hasattr(heartbeat, "reaper"):  # this checkout's beat script carries the turn's bid
            heartbeat.reaper = reaper
        else:  # earlier checkouts: the reaper bids from on_beat, a round trip of its own
            heartbeat._on_beat = reaper.maybe_run
        return SimWorker(heartbeat, reaper.maybe_run, due)

    def register(self) -> None:
        for worker in self.workers.values():
            worker.heartbeat.register()
            worker.last_beat = time.time()
        for thread in self.threads:
            thread.start()

    def _run(self, workers: list[SimWorker]) -> None:
        heap = [(w.due, i) for i, w in enumerate(workers)]
        heapq.heapify(heap)
        interval = self.settings.heartbeat_seconds
        while not self.stopping:
            due, i = heap[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.2))
                continue
            heapq.heapreplace(heap, (max(due + interval, time.monotonic()), i))
            with self.cond:
                if self.paused:
                    continue
                self.in_flight += 1
            try:
                worker = workers[i]
                with worker.lock:
                    if worker.alive:
                        self.late.append(time.monotonic() - due)
                        beat(worker, self.side)
            except Exception:
                log.exception("beat failed")
            finally:
                with self.cond:
                    self.in_flight -= 1
                    self.cond.notify_all()

    def command(self, line: str) -> dict[str, Any]:
        verb, _, arg = line.strip().partition(" ")
        if verb == "pause":
            with self.cond:
                self.paused = True
                self.cond.wait_for(lambda: self.in_flight == 0, timeout=30)
            return {"paused": True}
        if verb == "resume":
            with self.cond:
                self.paused = False
            return {"paused": False}
        if verb == "kill":
            worker = self.workers[arg]
            with worker.lock:
                worker.alive = False
            return {"killed": arg, "last_beat": worker.last_beat}
        if verb == "stats":
            return self.stats()
        if verb == "quit":
            return self.quit()
        return {"error": f"unknown command {line.strip()!r}"}

    def stats(self) -> dict[str, Any]:
        late = sorted(self.late)
        return {"beats": len(late), "late_p99": late[int(len(late) * 0.99)] if late else 0.0,
                "late_max": late[-1] if late else 0.0,
                "entry_bytes": len(next(iter(self.workers.values())).heartbeat.info()
                                   .model_dump_json()) if self.workers else 0}

    def quit(self) -> dict[str, Any]:
        out = self.stats()
        self.stopping = True
        for thread in self.threads:
            thread.join(timeout=5)
        self.side.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers.values():
            if worker.alive:
                worker.heartbeat.stop()
        return out


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s sim %(levelname)s %(message)s")
    with open(sys.argv[1]) as file:
        config = json.load(file)
    os.nice(config.get("nice", 10))
    host = Host(config)
    host.register()
    print(json.dumps({"ready": len(host.workers)}), flush=True)
    for line in sys.stdin:
        reply = host.command(line)
        print(json.dumps(reply), flush=True)
        if line.strip() == "quit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
