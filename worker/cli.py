"""The worker side's commands of `modelq`: `modelq worker` and `modelq demo`.

Registered under the `modelq.commands` entry-point group (pyproject.toml), which the
command line (tasks/cli/main.py) loads by name: the torch-free layer never names this one.
torch is imported only when a command runs.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import click

from schemas import ModelqError, parse_bytes
from tasks.cli.common import FAILED, INVALID, fail, local_ref, settings_of_command


@click.command()
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N")
@click.option("--name", default=None, help="Worker name (default: HOST-DEVICE).")
@click.option("--capacity", default=None, help="Bytes this worker may fill, e.g. 2GiB.")
@click.option("--metrics-port", default=None, type=int, help="Serve Prometheus metrics on this port.")
@click.option("--tasks", "task_modules", multiple=True, metavar="MODULE",
              help="Import a module of model tasks at start (repeat; also MODELQ_TASK_MODULES).")
@click.option("-E", "--events", is_flag=True, default=False,
              help="Send task events for `celery events` and Flower (also MODELQ_WORKER_EVENTS=1).")
def worker(device: str, name: str | None, capacity: str | None, metrics_port: int | None,
           task_modules: tuple[str, ...], events: bool) -> None:
    """Run one worker pinned to one device (foreground)."""
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    try:
        size = parse_bytes(capacity) if capacity else None
    except ValueError as exc:
        fail(f"--capacity: {exc}", INVALID)
    from worker.device import pin  # before torch: the device is pinned through the environment

    try:
        local_device = pin(device)
        from worker.app import WorkerOptions
        from worker.celery_worker import run_worker

        run_worker(settings_of_command(), WorkerOptions(
            device=device, name=name, capacity=size, metrics_port=metrics_port,
            local_device=local_device, task_modules=task_modules, events=events))
    except (ValueError, RuntimeError, ImportError) as exc:
        fail(str(exc), INVALID)
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """Exit once the worker has left the pool, without the interpreter's teardown: collecting
    the objects of torch, transformers and their kin takes seconds (4-8 s on two busy cores)
    that only hold up a supervisor's restart. Logs and output are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.command()
@click.option("--model", default=None, help="A local model folder (default: a tiny demo model built here).")
@click.option("--adapter", default=None, help="A LoRA adapter folder for --model.")
@click.option("--quant", default="nf4", show_default=True, type=click.Choice(["none", "int8", "nf4", "fp4"]))
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the pool and jobs.")
def demo(model: str | None, adapter: str | None, quant: str, timeout: float) -> None:
    """The main job end to end: load a model in nf4, attach a LoRA adapter, show the result."""
    from worker.demo import run_demo

    try:
        sys.exit(run_demo(settings_of_command(), model=local_ref(model) if model else None,
                          adapter=local_ref(adapter) if adapter else None, quant=quant,
                          timeout=timeout))
    except (RuntimeError, TimeoutError, ModelqError) as exc:
        fail(getattr(exc, "message", None) or str(exc), FAILED)
