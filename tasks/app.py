"""The Celery app both sides share: JSON only, late ack, prefetch 1 (no torch).

Producers send tasks by name (`TASK_RUN`); the worker registers the body under
that name in `worker/`, so a producer never imports worker code.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from tasks.keys import Keys
from tasks.settings import Settings

TASK_RUN = "modelq.run"
"""The one task: run a job envelope (load, attach or unload)."""


def create_app(settings: Settings) -> Celery:
    """A Celery app on `settings.redis_url`, set up for long, memory-heavy, at-least-once jobs."""
    sentinel = settings.sentinel
    broker = sentinel.broker_url() if sentinel is not None else settings.redis_url
    app = Celery("modelq", broker=broker, set_as_current=False)
    shared = Keys(settings.key_prefix).queue()  # queues follow the key prefix: pools share a Redis
    app.conf.update(
        # JSON only on the wire: a pickled message is refused, never executed.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,  # records live in tasks/store.py, not a result backend
        # At least once: ack after the job ends; a worker that dies leaves the task queued.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
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
            **({"master_name": sentinel.master, "sentinel_kwargs": settings.sentinel_kwargs()}
               if sentinel is not None else {}),
        },
        task_default_queue=shared,
        task_queues=[Queue(shared)],
        task_create_missing_queues=True,
    )
    return app
