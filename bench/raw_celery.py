"""The raw-Celery baseline: what a user writes by hand instead of modelq, on the same Redis.

A plain Celery app with modelq's wire settings (JSON, late ack, prefetch 1) and
nothing else, its results stored in Redis so the caller sees each task finish.
Two tasks: `bench.noop` does nothing (the queue alone), and `bench.model_noop`
reads the model the worker holds in a module global, loaded once as the worker
starts from BENCH_MODEL_PATH (the hand-written counterpart of a modelq model task
on a resident model). Started as `celery -A bench.raw_celery worker -P solo` with
BENCH_REDIS_URL naming the Redis.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_init

QUEUE = "bench.raw"
TASK = "bench.noop"
MODEL_TASK = "bench.model_noop"
MODEL_ENV = "BENCH_MODEL_PATH"

MODEL: Any = None
"""The worker's model, as a Celery user keeps it: a module global set once at start."""


def create_app(url: str) -> Celery:
    """The baseline app on `url`: the worker's and the caller's side alike."""
    app = Celery("bench_raw", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_acks_late=True, worker_prefetch_multiplier=1, worker_hijack_root_logger=False,
        # The same Celery machinery modelq's workers run (tasks/app.py): remote control and
        # heartbeats on (Celery's defaults, which `celery inspect` and Flower need), task
        # events, mingle and gossip off; the figures then measure what modelq adds.
        worker_send_task_events=False, worker_enable_remote_control=True,
        task_default_queue=QUEUE, result_expires=600, broker_connection_retry_on_startup=True,
    )
    return app


app = create_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@worker_init.connect
def load_model(**_: object) -> None:
    """Load BENCH_MODEL_PATH (when set) before the worker consumes: in the solo pool's process."""
    global MODEL
    path = os.environ.get(MODEL_ENV)
    if path:
        from transformers import AutoModelForCausalLM

        MODEL = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="cpu").eval()


@app.task(name=TASK)
def noop(payload: dict[str, object] | None = None) -> None:
    """Does nothing: the round trip is all queue."""
    return None


@app.task(name=MODEL_TASK)
def model_noop(payload: dict[str, object] | None = None) -> dict[str, bool]:
    """Reads the resident model and returns a constant, as `bench.noop` does on a modelq worker."""
    if MODEL is None:
        raise RuntimeError(f"this worker holds no model: start it with {MODEL_ENV} set")
    return {"ok": True}


def command(name: str) -> list[str]:
    """argv of one solo-pool worker consuming the baseline queue."""
    return ["celery", "-A", "bench.raw_celery", "worker", "-P", "solo", "-Q", QUEUE,
            "-n", f"{name}@%h", "--loglevel", "WARNING", "--without-mingle", "--without-gossip"]
