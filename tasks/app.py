"""The Celery app both sides share: JSON only, late ack, prefetch 1 (no torch).

Producers send tasks by name (`TASK_RUN`); the worker registers the body under
that name in `worker/`, so a producer never imports worker code.

`app` is the same app for Celery's own tools (`celery -A tasks.app:app inspect ping`,
`events`, `flower`): built from `Settings()` (the MODELQ_* environment) on first use,
so importing this module reads nothing and connects nowhere.
"""

from __future__ import annotations

import functools

from celery import Celery
from celery.local import Proxy
from kombu import Queue

from tasks.settings import Settings
from tasks.state.keys import Keys

TASK_RUN = "modelq.run"
"""The one task: run a job envelope (load, attach or unload)."""


def create_app(settings: Settings) -> Celery:
    """A Celery app on `settings.redis_url`, set up for long, memory-heavy, at-least-once jobs."""
    sentinel = settings.sentinel
    broker = sentinel.broker_url() if sentinel is not None else settings.redis_url
    keys = Keys(settings.key_prefix)
    app = Celery("modelq", broker=broker, set_as_current=False)
    shared = keys.queue()  # queues follow the key prefix: pools share a Redis
    app.conf.update(
        # JSON only on the wire: a pickled message is refused, never executed.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,  # records live in tasks/state/store.py, not a result backend
        # At least once: ack after the job ends; a worker that dies leaves the task queued.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # Celery's monitoring (`celery inspect`, `celery events`, Flower), under names of ours.
        # Remote control costs each worker a pub/sub subscription; events, a publish per change.
        worker_enable_remote_control=settings.remote_control,
        worker_send_task_events=settings.worker_events,
        control_exchange=keys.control_exchange(),
        event_exchange=keys.event_exchange(),
        event_queue_prefix=keys.event_exchange(),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for tasks past the visibility timeout every `restore_interval` seconds
            # (kombu's default sweep is 100 s, far above a low test visibility timeout).
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": settings.connect_timeout_seconds,
            # A Redis that accepts connections but never answers fails a send within the
            # command timeout (kombu's BRPOP waits 1 s a time, well inside it).
            "socket_timeout": settings.command_timeout_seconds,
            "global_keyprefix": "",
            # kombu's unacked hash, its index and the restore's mutex, under the prefix: each
            # deployment restores (and rescues, worker/recovery/rescue.py) only its own messages.
            "unacked_key": keys.unacked(),
            "unacked_index_key": keys.unacked_index(),
            "unacked_mutex_key": keys.unacked_mutex(),
            # One Redis list per queue, not kombu's four priority lists (no modelq message has
            # a priority): a worker's BRPOP names each of its queues once, which matters with
            # tenant shares (hundreds of queues per worker). Any priority lands in that list.
            "priority_steps": [0],
            **({"master_name": sentinel.master, "sentinel_kwargs": settings.sentinel_kwargs()}
               if sentinel is not None else {}),
        },
        task_default_queue=shared,
        task_queues=[Queue(shared)],
        task_create_missing_queues=True,
    )
    return app


@functools.cache
def default_app() -> Celery:
    """The app of this process's environment (`Settings()`), built once, on first use."""
    return create_app(Settings())


app: Celery = Proxy(default_app)
"""`celery -A tasks.app:app ...`: the app of MODELQ_REDIS_URL (redis://, rediss:// or sentinel://)."""
