"""`modelq worker`: one long-lived process pinned to one device, consuming jobs.

The device is pinned before torch loads; the model stack is imported at start so
no job pays for it; the Celery pool is `solo` (no fork after CUDA), so the model
cache lives as long as the process.

Faults: SIGTERM is a warm shutdown (the running job finishes, then the worker
leaves the registry and exits 0). A job whose CUDA error poisons the context, or
one stuck past its deadline, is failed; the worker then leaves the registry and
exits with EXIT_POISONED / EXIT_STUCK so its supervisor starts a clean process
(the unacked message comes back after the visibility timeout and is dropped,
its job having ended). Broker outages are retried by Celery with backoff.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import redis

from tasks.keys import SHARED_QUEUE, Keys, worker_queue
from tasks.settings import Settings

log = logging.getLogger(__name__)

EXIT_POISONED = 70
"""Exit status after a CUDA error made the device context unusable."""
EXIT_STUCK = 71
"""Exit status after a job stayed stuck past its deadline (worker/guard.py)."""


def default_name(device: str) -> str:
    return f"{socket.gethostname()}-{device.replace(':', '')}"


def run_worker(settings: Settings, *, device: str = "cpu", name: str | None = None,
               capacity: int | None = None, metrics_port: int | None = None) -> None:
    """Run a worker in the foreground until it is stopped (SIGTERM/SIGINT: warm shutdown)."""
    from worker.device import pin

    local_device = pin(device)
    from tasks.tenants import load_tenants

    tenants = load_tenants(settings.tenants_file)  # fails here, before any model work
    if tenants.multi:  # before huggingface_hub reads its settings: no token of the worker's own
        from worker.policy import drop_ambient_token

        drop_ambient_token()
    started = time.monotonic()
    import_model_stack()
    log.info("model stack imported in %.1fs", time.monotonic() - started)

    from schemas import LoadJob
    from tasks.app import TASK_RUN, create_app
    from tasks.client import connect
    from tasks.registry import claim
    from tasks.store import Store
    from worker import device as devices
    from worker.admission import Admission, AllocationFaults
    from worker.artifacts import Artifacts, default_root
    from worker.cache import KeepAliveTimer, ModelCache
    from worker.faults import Faults
    from worker.heartbeat import Heartbeat
    from worker.lease import Leases
    from worker.reaper import Reaper
    from worker.runner import Outcome, Runner, RunObserver
    from worker.service import ModelService, WorkerSpot

    name = name or default_name(device)
    keys = Keys(settings.key_prefix)
    client = connect(settings)
    cache = ModelCache(devices.capacity(local_device, capacity))
    leases = Leases(client, keys, worker=name, ttl=settings.worker_ttl_seconds)
    reaper = Reaper(client, keys, every=settings.worker_ttl_seconds)

    def on_beat() -> None:  # the heartbeat thread: keep our leases, rescue dead workers' queues
        leases.renew()
        reaper.maybe_run()

    celery_worker: list[Any] = []  # filled once the Celery worker exists
    heartbeat = Heartbeat(client, keys, name=name, device=device, capacity=lambda: cache.capacity,
                          free=lambda: cache.free,
                          models=lambda: [e.resident() for e in cache.entries()],
                          interval=settings.heartbeat_seconds, ttl=settings.worker_ttl_seconds,
                          renew=on_beat, on_reconnect=lambda: reconnect_consumer(celery_worker))

    def leave(code: int) -> None:
        """Leave the registry and exit at once: this process must not run another job."""
        heartbeat.stop()
        log.error("worker %s exits with status %d so that its supervisor restarts it", name, code)
        logging.shutdown()
        os._exit(code)

    reliability: dict[str, Any] = dict(
        leases=leases, default_timeout=settings.max_load_seconds, faults=Faults.from_settings(settings),
        on_stuck=lambda: leave(EXIT_STUCK))
    artifacts = Artifacts(Path(settings.artifact_dir) if settings.artifact_dir else default_root())
    admission = Admission(cache, local_device, artifacts, AllocationFaults.from_env())
    spot = WorkerSpot(name=name, device=device, local_device=local_device)
    keep_alive = KeepAliveTimer(cache, heartbeat.publish, settings.keep_alive_check_seconds)
    from tasks.logs import JobContext, set_worker

    set_worker(name)
    observers: list[RunObserver] = [JobContext()]
    if metrics_port is not None:
        from worker.metrics import Metrics

        metrics = Metrics(device=device, resident=lambda: [e.bytes for e in cache.entries()],
                          capacity=lambda: cache.capacity, client=client,
                          queues=[SHARED_QUEUE, worker_queue(name)])
        metrics.serve(metrics_port)
        observers.append(metrics)
        cache.on_evict = metrics.evicted
    store = Store(client, keys, settings.record_ttl_seconds)

    def claims(job: Any) -> list[tuple[str, str]]:
        """The routing claim a load that ran here drops (with its record, after the registry
        shows the model)."""
        return [claim(keys, job, name)] if isinstance(job, LoadJob) else []

    common: dict[str, Any] = dict(max_attempts=settings.max_attempts, observers=observers,
                                  on_change=lambda: heartbeat.publish(force=False),
                                  claims=claims, **reliability)
    queues = [SHARED_QUEUE, worker_queue(name)]
    if tenants.multi:  # verified jobs, tenant rules, fair tenant queues
        from tasks.tenants import all_queues, publish_limits
        from worker.policy import Gate
        from worker.tenancy import TenantModelService

        publish_limits(client, keys, tenants)
        queues += all_queues(tenants, worker_queue(name))
        service: ModelService = TenantModelService(cache, spot, tenants, admission)
        runner = Runner(store, service, admit=Gate(tenants, store).admit, **common)
    else:
        service = ModelService(cache, spot, admission)
        runner = Runner(store, service, **common)

    app = create_app(settings)

    # Any args are accepted so that a malformed message is refused by the runner (InvalidJob),
    # not by a TypeError in Celery's call. A busy job is handed back with a countdown: the
    # lease holder is still on it, and the next look either finds it ended or its holder dead.
    @app.task(name=TASK_RUN, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def run(task: Any, *args: Any, **kwargs: Any) -> None:
        payload = args[0] if len(args) == 1 and not kwargs else {"args": args, "kwargs": kwargs}
        outcome = runner.run(payload)
        if outcome is Outcome.busy:
            raise task.retry(countdown=settings.worker_ttl_seconds, max_retries=None)
        if outcome is Outcome.poisoned:
            leave(EXIT_POISONED)

    from celery.signals import setup_logging, worker_ready

    @setup_logging.connect(weak=False)
    def _keep_our_logging(**_: object) -> None:
        """A receiver here tells Celery to leave logging as the entry point set it up."""

    # Celery's own per-task lines ('received', 'succeeded in') repeat the runner's job
    # lines, without the job's tenant or outcome; keep its warnings and errors only.
    for noisy in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        log.info("worker %s ready", name)

    heartbeat.register()
    heartbeat.start()
    keep_alive.start()
    log.info("worker %s on %s (%s): capacity %d bytes, %d tenant(s), queues %s", name, device,
             local_device, cache.capacity, len(tenants), ", ".join(queues))
    try:
        worker = app.Worker(hostname=f"{name}@{socket.gethostname()}", pool="solo", concurrency=1,
                            queues=queues, loglevel="WARNING",
                            without_mingle=True, without_gossip=True, without_heartbeat=True,
                            optimization="fair", quiet=True)
        celery_worker.append(worker)
        worker.start()
    finally:
        keep_alive.stop()
        heartbeat.stop()
        log.info("worker %s stopped", name)


def reconnect_consumer(box: list[Any]) -> None:
    """Redis is back after an outage: make Celery's consumer reconnect now.

    Celery notices most broker losses itself, but one that lands while it acks a
    task can leave the consumer polling a dead connection for good (celery#8091).
    Raising a connection error inside its event loop makes it reconnect; if it had
    already reconnected, this costs one more reconnect.
    """
    hub = getattr(box[0], "hub", None) if box else None
    if hub is not None:
        hub.call_soon(_raise_reconnect)


def _raise_reconnect() -> None:
    raise redis.ConnectionError("Redis came back after an outage: reconnecting the consumer")


def import_model_stack() -> None:
    """Import torch, transformers, peft, bitsandbytes and accelerate once, at start."""
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import worker.adapters  # noqa: F401
    import worker.loader  # noqa: F401
