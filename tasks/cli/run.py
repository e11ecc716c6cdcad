"""`modelq run`, `modelq generate`, `modelq tasks`: work on a loaded model (no torch).

A model is named by its key (`--model-key KEY`, or a bare hex key for `generate`) or by a
REF with load flags: then the run job carries the load, which the worker runs first.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import click

from tasks.cli.common import (
    INVALID,
    TIMED_OUT,
    client_of_command,
    exit_for,
    fail,
    show,
    submit,
    submit_and_report,
    tenant_option,
)
from tasks.cli.jobs import load_options, load_spec

_MODEL_KEY = re.compile(r"[0-9a-f]{16,64}")


def _json_arg(value: str, what: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        fail(f"{what} takes JSON (for a string, quote it: '\"text\"'); got {value[:40]!r}", INVALID)


def _target(ref: str | None, model_key: str | None, tenant: str, flags: dict[str, Any]) -> dict[str, Any]:
    if (ref is None) == (model_key is None):
        fail("name the model once: --model-key KEY (a resident model) or a REF to load", INVALID)
    if model_key is not None:
        return {"model_key": model_key}
    assert ref is not None
    if _MODEL_KEY.fullmatch(ref) and not os.path.isdir(ref):
        return {"model_key": ref}
    load = load_spec(ref, tenant, flags)
    load.pop("kind")
    return {"load": load}


@click.command()
@click.argument("task")
@click.argument("ref", required=False)
@click.option("--model-key", default=None, help="A resident model's key (instead of REF).")
@load_options
@click.option("--adapter", "adapters", multiple=True, metavar="NAME",
              help="Adapter active for the call (repeat; default: as the model stands).")
@click.option("--no-adapter", is_flag=True, help="Run on the base alone, no adapter active.")
@click.option("--arg", "args", multiple=True, metavar="JSON", help="A positional argument (repeat).")
@click.option("--kwargs", default=None, metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--task-timeout", default=None, type=float, help="Seconds the task (and load) may take.")
@tenant_option()
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit code says how.")
@click.option("--timeout", default=None, type=float, help="Seconds to wait (with --wait).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def run(task: str, ref: str | None, model_key: str | None, adapters: tuple[str, ...],
        no_adapter: bool, args: tuple[str, ...], kwargs: str | None, task_timeout: float | None,
        tenant: str, wait: bool, timeout: float | None, as_json: bool, **flags: Any) -> None:
    """Run TASK on a model: a resident one (--model-key KEY) or REF, loaded first."""
    if no_adapter and adapters:
        fail("give --adapter or --no-adapter, not both", INVALID)
    job = {"kind": "run", "task": task, "tenant": tenant,
           "model": _target(ref, model_key, tenant, flags),
           "adapters": [] if no_adapter else (list(adapters) or None),
           "args": [_json_arg(a, "--arg") for a in args],
           "kwargs": _json_arg(kwargs, "--kwargs") if kwargs else {},
           "timeout_seconds": task_timeout}
    submit_and_report(job, wait, timeout, as_json)


@click.command()
@click.argument("model")
@click.argument("prompt")
@load_options
@click.option("--adapter", "adapters", multiple=True, metavar="NAME",
              help="Adapter active for the call (repeat; default: as the model stands).")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@tenant_option()
@click.option("--timeout", default=None, type=float, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def generate(model: str, prompt: str, adapters: tuple[str, ...], max_new_tokens: int, tenant: str,
             timeout: float | None, as_json: bool, **flags: Any) -> None:
    """Complete PROMPT greedily on MODEL (a resident model's key, or a REF to load) and print it."""
    from schemas import JobStatus, RunResult, TimedOut  # here: the CLI starts without schemas

    handle = submit({"kind": "run", "task": "modelq.generate", "tenant": tenant,
                     "model": _target(model, None, tenant, flags), "adapters": list(adapters) or None,
                     "kwargs": {"prompts": prompt, "max_new_tokens": max_new_tokens}})
    try:
        record = handle.wait(timeout=timeout)
    except TimedOut as exc:
        fail(exc.message, TIMED_OUT)
    if as_json or record.status is not JobStatus.succeeded:
        show(record, as_json)
    elif isinstance(record.result, RunResult) and isinstance(record.result.value, list):
        click.echo(record.result.value[0])
    sys.exit(exit_for(record))


@click.command(name="tasks")
@click.option("--json", "as_json", is_flag=True, help="Print {task: [workers]} as JSON.")
def list_tasks(as_json: bool) -> None:
    """List the model tasks the live workers offer."""
    offered = client_of_command().tasks()
    if as_json:
        click.echo(json.dumps(offered, indent=2))
        return
    for task, workers in offered.items():
        click.echo(f"{task}  ({', '.join(workers)})")
    if not offered:
        click.echo("no live worker offers any task")


COMMANDS = [run, generate, list_tasks]
