"""The Celery binding of a worker: the one task, its signals, and the reconnect workaround.

Everything else of the worker lives in `WorkerApp` (worker/app.py); this module only
hands Celery's messages to it. The pool is `solo` (no fork after CUDA), so the model
cache lives as long as the process.

Faults: SIGTERM is a warm shutdown (the running job finishes, then the worker leaves
the registry and exits 0). A job whose CUDA error poisons the context, or one stuck
past its deadline, is failed; the worker then leaves the registry and exits with
EXIT_POISONED / EXIT_STUCK so its supervisor starts a clean process (the unacked
message comes back after the visibility timeout and is dropped, its job having ended).
Broker outages are retried by Celery with backoff.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import redis

from tasks.app import TASK_RUN, create_app
from tasks.settings import Settings
from worker.app import EXIT_POISONED, WorkerApp, WorkerOptions
from worker.jobs.attempt import Outcome
from worker.recovery.quarantine import transport_for

log = logging.getLogger(__name__)


def run_worker(settings: Settings, options: WorkerOptions) -> None:
    """Run a worker in the foreground until it is stopped (SIGTERM/SIGINT: warm shutdown).

    `options.local_device` is the device as pinned (worker/device.py `pin`) before torch
    was imported.
    """
    from tasks.tenants import load_tenants

    tenants = load_tenants(settings.tenants_file)  # fails here, before any model work
    if tenants.multi:  # before huggingface_hub reads its settings: no token of the worker's own
        from worker.policy import drop_ambient_token

        drop_ambient_token()
    started = time.monotonic()
    import_model_stack()
    log.info("model stack imported in %.1fs", time.monotonic() - started)
    app = WorkerApp(settings, options, tenants=tenants)
    celery_worker = bind(app, events=options.events or settings.worker_events)
    app.start()
    try:
        celery_worker.start()
    finally:
        app.stop()


def bind(app: WorkerApp, *, events: bool = False) -> Any:
    """A Celery worker that runs `app`'s jobs from its queues (started by the caller).

    `events`: send task events from the start (Celery's `-E`), for `celery events` and Flower.
    """
    celery = create_app(app.settings)
    # Undecodable messages moved aside, and counted by the worker's metrics.
    moved_aside = app.metrics.moved_aside if app.metrics is not None else None
    celery.conf.broker_transport = transport_for(app.settings, moved_aside)
    control = app.settings.remote_control
    countdown = app.settings.worker_ttl_seconds

    # Any args are accepted so that a malformed message is refused by the runner (InvalidJob),
    # not by a TypeError in Celery's call. A busy job is handed back with a countdown: the
    # lease holder is still on it, and the next look either finds it ended or its holder dead.
    @celery.task(name=TASK_RUN, bind=True, acks_late=True, reject_on_worker_lost=True,
                 max_retries=None)  # type: ignore[untyped-decorator]
    def run(task: Any, *args: Any, **kwargs: Any) -> None:
        payload = args[0] if len(args) == 1 and not kwargs else {"args": args, "kwargs": kwargs}
        outcome = app.run(payload)
        if outcome is Outcome.busy:
            raise task.retry(countdown=countdown, max_retries=None)
        if outcome is Outcome.poisoned:
            app.leave(EXIT_POISONED)

    _quiet_celery(app.name)
    _scrub_stats()
    # Mingle (a second's wait at start for other workers' replies) and gossip (every worker
    # consuming every other's events, N² as the pool grows) stay off: modelq's registry does
    # their work. Heartbeat events stay on with remote control: Flower and `celery events`
    # show a worker online by them, and `enable_events` needs their dispatcher.
    worker = celery.Worker(hostname=f"{app.name}@{socket.gethostname()}", pool="solo",
                           concurrency=1, queues=app.queues, loglevel="WARNING",
                           without_mingle=True, without_gossip=True,
                           without_heartbeat=not (control or events), task_events=events,
                           optimization="fair", quiet=True)
    log.info("worker %s: remote control %s, task events %s", app.name,
             "on" if control else "off", "on" if events else "off (Flower turns them on)")
    app.on_reconnect = lambda: reconnect_consumer(worker)
    return worker


def _quiet_celery(name: str) -> None:
    from celery.signals import setup_logging, worker_ready

    @setup_logging.connect(weak=False)  # type: ignore[untyped-decorator]
    def _keep_our_logging(**_: object) -> None:
        """A receiver here tells Celery to leave logging as the entry point set it up."""

    # Celery's own per-task lines ('received', 'succeeded in') repeat the runner's job
    # lines, without the job's tenant or outcome; keep its warnings and errors only.
    for noisy in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(**_: object) -> None:
        log.info("worker %s ready", name)


def _scrub_stats() -> None:
    """`celery inspect stats` (and Flower's worker page) without the sentinels' password.

    Celery drops the broker's password from a worker's stats but sends its transport
    options as they are, `sentinel_kwargs` and its password included.
    """
    from celery.worker.control import inspect_command

    @inspect_command(name="stats")  # type: ignore[untyped-decorator]
    def stats(state: Any, **_: Any) -> Any:
        """Request worker statistics/information."""
        return scrub_passwords(state.consumer.controller.stats())


def scrub_passwords(value: Any) -> Any:
    """`value` with every mapping's password-named entries masked, at any depth."""
    if isinstance(value, dict):
        return {key: "********" if "password" in str(key).lower() else scrub_passwords(item)
                for key, item in value.items()}
    return value


def reconnect_consumer(worker: Any) -> None:
    """Redis is back after an outage: make Celery's consumer reconnect now.

    Celery notices most broker losses itself, but one that lands while it acks a
    task can leave the consumer polling a dead connection for good (celery#8091).
    Raising a connection error inside its event loop makes it reconnect; if it had
    already reconnected, this costs one more reconnect.
    """
    hub = getattr(worker, "hub", None)
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

    import worker.models.adapters  # noqa: F401
    import worker.models.loader  # noqa: F401
