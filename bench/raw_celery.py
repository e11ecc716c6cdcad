"""The raw-Celery baseline: a no-op task on the same Redis, with modelq's delivery settings.

What a user would write instead of modelq: a plain Celery app whose task does
nothing, its result stored in Redis so the caller sees it finish. Started as
`celery -A bench.raw_celery worker -P solo` with BENCH_REDIS_URL naming the
Redis; it shares modelq's wire settings (JSON, late ack, prefetch 1) and nothing else.
"""

from __future__ import annotations

import os

from celery import Celery

QUEUE = "bench.raw"
TASK = "bench.noop"



def create_app(url: str) -> Celery:
    """The baseline app on `url`: the worker's and the caller's side alike."""
    app = Celery("bench_raw", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_acks_late=True, worker_prefetch_multiplier=1, worker_hijack_root_logger=False,
        worker_send_task_events=False, worker_enable_remote_control=False,
        task_default_queue=QUEUE, result_expires=600, broker_connection_retry_on_startup=True,
    )
    return app


app = create_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@app.task(name=TASK)
def noop(payload: dict[str, object] | None = None) -> None:
    """Does nothing: the round trip is all queue."""
    return None


def command(name: str) -> list[str]:
    """argv of one solo-pool worker consuming the baseline queue."""
    return ["celery", "-A", "bench.raw_celery", "worker", "-P", "solo", "-Q", QUEUE,
            "-n", f"{name}@%h", "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
            "--without-heartbeat"]
