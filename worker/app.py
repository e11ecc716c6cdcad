"""The worker's composition root: every part of one worker process, built from Settings.

`WorkerApp(settings, options)` builds the cache, admission, leases, heartbeat, reaper,
store, handlers, runner and (optionally) metrics, and owns their start and stop. It
knows nothing of Celery: worker/celery_worker.py binds it to a Celery worker, and a
test can build one with a Redis alone and hand `run` a message itself.

The device is pinned by the caller before torch is imported (worker/device.py `pin`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import redis

from schemas import LoadJob
from tasks.logs import JobContext, set_worker
from tasks.settings import Settings
from tasks.state.connection import connect
from tasks.state.keys import Keys
from tasks.state.model_specs import ModelSpecs
from tasks.state.registry import claim
from tasks.state.store import Store
from tasks.state.turns import Turns
from tasks.tenants import Tenants, load_tenants, publish_limits, share_waiting
from worker import device as devices
from worker.fault_hooks import AllocationFaults, Faults, FaultSettings
from worker.handlers import handler_table
from worker.jobs.attempt import Outcome, RunHooks, RunObserver
from worker.jobs.batching import Batcher, BatchOptions
from worker.jobs.gate import Gate, OpenGate, SignatureGate
from worker.jobs.gather import Gatherer
from worker.jobs.lease import Leases
from worker.jobs.runner import Runner, RunOptions
from worker.models.admission import Admission
from worker.models.artifacts import Artifacts
from worker.models.cache import KeepAliveTimer, ModelCache
from worker.models.residents import Residents
from worker.modeltasks.registry import import_task_modules
from worker.policy import TenantPolicy
from worker.recovery.heartbeat import Heartbeat, WorkerState
from worker.recovery.reaper import Reaper, reap_every
from worker.recovery.rescue import Redelivery, Resend, celery_send

log = logging.getLogger(__name__)

EXIT_POISONED = 70
"""Exit status after a CUDA error made the device context unusable."""
EXIT_STUCK = 71
"""Exit status after a job stayed stuck past its deadline (worker/jobs/guard.py)."""


@dataclass(frozen=True)
class WorkerOptions:
    """What `modelq worker` is told on its command line."""

    device: str = "cpu"
    name: str | None = None
    capacity: int | None = None
    metrics_port: int | None = None
    local_device: str = "cpu"  # as torch sees the device after pinning
    task_modules: tuple[str, ...] = field(default=())
    events: bool = False  # send task events from the start (`-E`), else as Settings.worker_events


class WorkerApp:
    """One worker process: its parts, wired once, started and stopped together."""

    def __init__(self, settings: Settings, options: WorkerOptions, *,
                 client: redis.Redis | None = None, tenants: Tenants | None = None,
                 faults: FaultSettings | None = None) -> None:
        self.settings = settings
        self.tenants = tenants if tenants is not None else load_tenants(settings.tenants_file)
        faults = faults if faults is not None else FaultSettings()
        self.identity = devices.WorkerIdentity(options.name or devices.default_name(options.device),
                                               options.device, options.local_device)
        self.name = self.identity.name
        self.keys = Keys(settings.key_prefix)
        self.redis = client if client is not None else connect(settings)
        self.on_reconnect: Callable[[], None] = lambda: None  # set by the Celery binding
        observers: list[RunObserver] = [JobContext()]
        self.metrics = self._metrics(options.metrics_port, observers)
        self.cache = ModelCache(devices.capacity(options.local_device, options.capacity),
                                on_evict=self.metrics.evicted if self.metrics else None)
        self.leases = Leases(self.redis, self.keys, worker=self.name, ttl=settings.worker_ttl_seconds)
        self.reaper = Reaper(self.redis, self.keys, every=reap_every(settings.worker_ttl_seconds),
                             worker=self.name, sweeps=self._sweeps(),
                             watch=settings.visibility_timeout + 2 * settings.worker_ttl_seconds)
        self.heartbeat = self._heartbeat()
        self.keep_alive = KeepAliveTimer(self.cache, self.heartbeat.publish,
                                         settings.keep_alive_check_seconds)
        self.store = Store(self.redis, self.keys, settings.record_ttl_seconds)
        self.turns = Turns.for_worker(self.redis, self.keys, self.tenants,
                                      self.keys.worker_queue(self.name),
                                      worker_ttl=settings.worker_ttl_seconds)
        self.policy = TenantPolicy(self.tenants, settings.roots)
        self.residents = Residents(self.cache, self.identity, self.policy)
        artifacts = Artifacts(Path(settings.artifact_dir) if settings.artifact_dir
                              else settings.home / "artifacts")
        admission = Admission(self.cache, options.local_device, artifacts,
                              AllocationFaults(faults.fail_alloc))
        self.handlers = handler_table(
            self.residents, admission, claim=self._claim, max_result_bytes=settings.max_result_bytes,
            specs=ModelSpecs(self.redis, self.keys, settings.record_ttl_seconds),
            max_run_seconds=settings.max_run_seconds, checkpoint_dir=settings.checkpoint_root)
        self.tasks = import_task_modules((*settings.task_modules, *options.task_modules))
        self.runner = Runner(
            self.store, self.handlers, self.leases, worker=(self.name, options.device),
            gate=self._gate(),
            options=RunOptions(max_attempts=settings.max_attempts,
                               default_timeout=settings.max_load_seconds,
                               faults=Faults.from_settings(faults)),
            hooks=RunHooks(on_change=lambda: self.heartbeat.publish(force=False),
                           on_stuck=lambda: self.leave(EXIT_STUCK), observers=observers))
        self.runner.batcher = self._batcher()

    @property
    def queues(self) -> list[str]:
        """The queues this worker consumes: the shared one and its own (their tenant shares
        reach them by turns, tasks/state/turns.py)."""
        return [self.keys.queue(), self.keys.worker_queue(self.name)]

    def run(self, payload: Any) -> Outcome:
        """Run one job message (what the Celery task body calls), the next tenant's turn
        taken first: the message just taken leaves room in its queue."""
        self.turns.take()
        return self.runner.run(payload)

    def start(self) -> None:
        """Join the pool: publish tenant limits, register (WorkerNameTaken if the name is live),
        start the heartbeat, keep-alive timer and metrics server."""
        set_worker(self.name)
        publish_limits(self.redis, self.keys, self.tenants)
        queue = self.keys.queue()
        shared = share_waiting(self.redis, self.tenants, base=queue)  # queued with no worker up
        if shared:
            log.info("moved %d job(s) waiting in %s into their tenants' shares", shared, queue)
        self.turns.sweep()  # the shares that hold messages take their turns from now
        self.heartbeat.register()
        self.heartbeat.start()
        self.keep_alive.start()
        if self.metrics is not None and self.metrics_port is not None:
            self.metrics.serve(self.metrics_port)
        log.info("worker %s on %s (%s): capacity %d bytes, %d tenant(s), queues %s%s", self.name,
                 self.identity.device, self.identity.local_device, self.cache.capacity,
                 len(self.tenants), ", ".join(self.queues), self._shares_text())

    def stop(self) -> None:
        """Leave the pool (warm shutdown: the caller lets the running job finish first)."""
        self.keep_alive.stop()
        self.heartbeat.stop()
        log.info("worker %s stopped", self.name)

    def leave(self, code: int) -> None:
        """Leave the registry and exit at once: this process must not run another job."""
        self.heartbeat.stop()
        log.error("worker %s exits with status %d so that its supervisor restarts it", self.name, code)
        logging.shutdown()
        os._exit(code)

    # --- parts ---------------------------------------------------------------------------

    def _metrics(self, port: int | None, observers: list[RunObserver]) -> Any:
        self.metrics_port = port
        if port is None:
            return None
        from worker.metrics import Metrics

        metrics = Metrics(device=self.identity.device,
                          resident=lambda: [e.bytes for e in self.cache.entries()],
                          capacity=lambda: self.cache.capacity, client=self.redis,
                          queues=[self.keys.queue(), self.keys.worker_queue(self.name)],
                          dead_letters=self.keys.dead_letters())
        observers.append(metrics)
        return metrics

    def _heartbeat(self) -> Heartbeat:
        def on_beat() -> None:  # the heartbeat thread, after the reaper's turn if it won one
            self.leases.renew()
            self.turns.sweep()  # after the reaper: what it put back on shares takes its turns

        def state() -> WorkerState:
            return WorkerState(self.cache.capacity, self.cache.free,
                               [e.resident() for e in self.cache.entries()], self.tasks,
                               self.own_queues)

        settings = self.settings
        heartbeat = Heartbeat(self.redis, self.keys, (self.name, self.identity.device), state=state,
                              timing=(settings.heartbeat_seconds, settings.worker_ttl_seconds),
                              on_beat=on_beat, on_reconnect=lambda: self.on_reconnect())
        heartbeat.reaper = self.reaper
        return heartbeat

    def _sweeps(self) -> list[Callable[[], int]]:
        """What the reaper's turn runs besides moving orphaned queues (worker/recovery/rescue.py)."""
        settings, grace = self.settings, self.settings.lost_job_grace_seconds
        return [Redelivery(self.redis, self.keys, worker_ttl=settings.worker_ttl_seconds,
                           grace=grace).run,
                Resend(self.redis, self.keys, celery_send(settings, self.tenants), grace=grace).run]

    @cached_property
    def own_queues(self) -> tuple[str, ...]:
        """Every list a producer may send this worker's jobs to: the queues it consumes and
        their tenant shares (fixed for the worker's life: worked out once, not on every beat).
        Its registry memo names them, so the reaper drains them all."""
        return (*self.queues, *(q for shares in self.turns.shares.values() for q in shares))

    def _shares_text(self) -> str:
        shares = sum(len(s) for s in self.turns.shares.values())
        return f", and {shares} tenant shares of them by turns" if shares else ""

    def _batcher(self) -> Batcher | None:
        """Cross-job batches of run jobs (worker/jobs/batching.py); None with batch_max_jobs 1."""
        settings = self.settings
        if settings.batch_max_jobs <= 1:
            return None
        from worker.handlers.run import RunHandler
        from worker.handlers.run_batch import RunBatches

        run = self.handlers["run"]
        assert isinstance(run, RunHandler)
        gatherer = Gatherer(self.redis, self.keys, self.queues, refill=self.turns.take)
        return Batcher(RunBatches(run), gatherer,
                       BatchOptions(settings.batch_max_jobs, settings.batch_wait_ms / 1000),
                       on_batch=self.metrics.batch_ran if self.metrics is not None else _no_batch)

    def _gate(self) -> Gate:
        return SignatureGate(self.tenants, self.store) if self.tenants.multi else OpenGate()

    def _claim(self, job: LoadJob) -> tuple[str, str]:
        """The routing claim a load that ran here drops (with its record, after the registry
        shows the model)."""
        return claim(self.keys, job, self.name)


def _no_batch(size: int) -> None:
    """No metrics: a batch's size goes nowhere."""
