"""The `modelq` command line (no torch).

The worker side's commands (`modelq worker`, `modelq demo`) are found through the
`modelq.commands` entry-point group and loaded only when named: this layer never
imports worker/.

Exit codes: 0 succeeded, 1 the job failed or was cancelled, 2 the input was invalid
(nothing was enqueued), 3 timed out waiting, 4 Redis unreachable (nothing enqueued).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from schemas import (
    AccessDenied,
    BrokerUnavailable,
    InvalidJob,
    JobNotFound,
    JobRecord,
    JobStatus,
    ModelNotFound,
    ModelqError,
    QuotaExceeded,
    TimedOut,
    parse_job,
)
from schemas.jobs import describe
from schemas.refs import is_local_path
from tasks import render
from tasks.settings import Settings

OK, FAILED, INVALID, TIMED_OUT, UNREACHABLE = 0, 1, 2, 3, 4
COMMANDS_GROUP = "modelq.commands"
"""Entry-point group of commands registered by other layers (the worker's: worker, demo)."""
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def settings_of_command() -> Settings:
    """The one Settings of this command, built by `main` (flags over MODELQ_* variables)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Settings) else Settings()


def _client() -> Any:
    from tasks.client import Client

    return Client(settings_of_command())


def fail(message: str, code: int) -> NoReturn:
    render.console(stderr=True).print(f"[red]error:[/red] {message}")
    sys.exit(code)


def _exit_for(record: JobRecord) -> int:
    return OK if record.status is JobStatus.succeeded else FAILED


def local_ref(value: str) -> str:
    """A ref as typed: an existing relative folder becomes absolute; else as given."""
    if os.path.isdir(value) and not value.startswith(("/", "~")):
        return os.path.abspath(value)
    return value


def _adapter(value: str) -> dict[str, Any]:
    head, sep, tail = value.rpartition(":")
    if sep and head and _ADAPTER_NAME.fullmatch(tail):
        return {"ref": local_ref(head), "name": tail}
    return {"ref": local_ref(value)}


def _show(record: JobRecord, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json(indent=2))
    else:
        render.console().print(render.record_table(record))


def _submit_and_report(job: dict[str, Any], wait: bool, timeout: float | None, as_json: bool) -> None:
    try:
        parsed = parse_job(job)
        handle = _client().submit(parsed)
    except InvalidJob as exc:
        fail(f"invalid job: {exc.message}", INVALID)
    except BrokerUnavailable as exc:
        fail(exc.message, UNREACHABLE)
    except (ModelNotFound, AccessDenied, QuotaExceeded) as exc:  # nothing was enqueued
        fail(exc.message, INVALID)
    if not wait:
        if as_json:
            _show(handle.status(), True)
        else:
            click.echo(handle.job_id)
        return
    try:
        record = handle.wait(timeout=timeout)
    except TimedOut as exc:
        if as_json:
            _show(handle.status(), True)
        fail(exc.message, TIMED_OUT)
    _show(record, as_json)
    sys.exit(_exit_for(record))


class ModelqGroup(click.Group):
    """The command group, plus the commands other layers register as `modelq.commands`
    entry points (loaded only when listed or run)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(e.name for e in _plugins())})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        for entry in _plugins():
            if entry.name == cmd_name:
                loaded: click.Command = entry.load()
                return loaded
        return None


def _plugins() -> list[EntryPoint]:
    return list(entry_points(group=COMMANDS_GROUP))


@click.group(cls=ModelqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("--log-json", is_flag=True, default=None,
              help="Log JSON lines with job id, tenant and worker (or MODELQ_LOG_JSON=1).")
@click.pass_context
def main(ctx: click.Context, verbose: int, log_json: bool | None) -> None:
    """modelq: a job queue that loads Hugging Face models and PEFT adapters onto GPU workers."""
    from tasks import logs

    try:
        settings = Settings(log_json=True) if log_json else Settings()
    except ValidationError as exc:  # a MODELQ_* variable that doesn't parse
        fail(f"settings: {describe(exc)} (check the MODELQ_* environment variables)", INVALID)
    ctx.obj = settings
    logs.configure(logging.WARNING - 10 * verbose, as_json=settings.log_json)


@main.command()
@click.argument("ref")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub repo.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--quant", default="none", show_default=True,
              type=click.Choice(["none", "int8", "nf4", "fp4"]))
@click.option("--double-quant/--no-double-quant", default=None, help="4-bit: quantize the scales too.")
@click.option("--compute-dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="4-bit: dtype of the matmuls.")
@click.option("--int8-threshold", default=None, type=float, help="int8: outlier threshold.")
@click.option("--skip-module", "skip_modules", multiple=True, help="Module left unquantized (repeat).")
@click.option("--device-map", default=None,
              help="auto, balanced, sequential, a device (cpu, cuda:0) or a JSON module map.")
@click.option("--max-memory", multiple=True, metavar="DEV=SIZE", help="e.g. 0=20GiB, cpu=30GiB (repeat).")
@click.option("--adapter", "adapters", multiple=True, metavar="REF[:NAME]", help="Adapter to attach (repeat).")
@click.option("--active-adapter", default=None, help="Adapter to activate (default: the last).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the repo's own code (pinned commit only).")
@click.option("--pin", is_flag=True, help="Never evict it to make room (only unload frees it).")
@click.option("--keep-alive", "keep_alive", default=None, type=float, metavar="SECONDS",
              help="Unload it after this many seconds unused.")
@click.option("--tenant", default=lambda: os.environ.get("MODELQ_TENANT", "default"))
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit code says how.")
@click.option("--timeout", default=None, type=float, help="Seconds to wait (with --wait).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def load(ref: str, revision: str | None, dtype: str, quant: str, double_quant: bool | None,
         compute_dtype: str | None, int8_threshold: float | None, skip_modules: tuple[str, ...],
         device_map: str | None, max_memory: tuple[str, ...], adapters: tuple[str, ...],
         active_adapter: str | None, trust_remote_code: bool, pin: bool, keep_alive: float | None,
         tenant: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Submit a load job for REF (a hub repo id or a local folder); prints its id."""
    model: dict[str, Any] = ({"path": local_ref(ref)} if os.path.isdir(ref) or is_local_path(ref)
                             else {"repo_id": ref})
    if revision:
        model["revision"] = revision
    quantization: dict[str, Any] = {"method": quant}
    for key, value in (("double_quant", double_quant), ("compute_dtype", compute_dtype),
                       ("int8_threshold", int8_threshold)):
        if value is not None:
            quantization[key] = value
    if skip_modules:
        quantization["skip_modules"] = list(skip_modules)
    placement: dict[str, Any] = {}
    if device_map:
        placement["device_map"] = json.loads(device_map) if device_map.startswith("{") else device_map
    if max_memory:
        try:
            placement["max_memory"] = dict(item.split("=", 1) for item in max_memory)
        except ValueError:
            fail("--max-memory takes DEV=SIZE, e.g. 0=20GiB", INVALID)
    job: dict[str, Any] = {"kind": "load", "model": model, "dtype": dtype,
                           "quantization": quantization, "placement": placement,
                           "adapters": [_adapter(a) for a in adapters], "tenant": tenant,
                           "trust_remote_code": trust_remote_code, "pin": pin,
                           "keep_alive_seconds": keep_alive}
    if active_adapter:
        job["active_adapter"] = active_adapter
    _submit_and_report(job, wait, timeout, as_json)


@main.command()
@click.argument("model_key")
@click.argument("adapter_ref")
@click.option("--name", default="default", show_default=True, help="Adapter name on the model.")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub adapter repo.")
@click.option("--no-activate", is_flag=True, help="Attach without making it active.")
@click.option("--tenant", default=lambda: os.environ.get("MODELQ_TENANT", "default"))
@click.option("--wait", is_flag=True)
@click.option("--timeout", default=None, type=float)
@click.option("--json", "as_json", is_flag=True)
def attach(model_key: str, adapter_ref: str, name: str, revision: str | None, no_activate: bool,
           tenant: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Attach ADAPTER_REF to the resident model MODEL_KEY."""
    ref = local_ref(adapter_ref)
    adapter: Any = {"path": ref} if os.path.isdir(adapter_ref) else ref
    if revision:
        adapter = {"repo_id": adapter_ref, "revision": revision}
    _submit_and_report({"kind": "attach", "model_key": model_key, "adapter": adapter, "name": name,
                        "activate": not no_activate, "tenant": tenant}, wait, timeout, as_json)


@main.command()
@click.argument("model_key")
@click.option("--tenant", default=lambda: os.environ.get("MODELQ_TENANT", "default"))
@click.option("--wait", is_flag=True)
@click.option("--timeout", default=None, type=float)
@click.option("--json", "as_json", is_flag=True)
def unload(model_key: str, tenant: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Free the resident model MODEL_KEY."""
    _submit_and_report({"kind": "unload", "model_key": model_key, "tenant": tenant}, wait, timeout,
                       as_json)


@main.command()
@click.argument("model_key")
@click.argument("name")
@click.option("--tenant", default=lambda: os.environ.get("MODELQ_TENANT", "default"))
@click.option("--wait", is_flag=True)
@click.option("--timeout", default=None, type=float)
@click.option("--json", "as_json", is_flag=True)
def detach(model_key: str, name: str, tenant: str, wait: bool, timeout: float | None,
           as_json: bool) -> None:
    """Detach the adapter NAME from the resident model MODEL_KEY (the model stays)."""
    _submit_and_report({"kind": "unload", "model_key": model_key, "adapter": name, "tenant": tenant},
                       wait, timeout, as_json)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str, as_json: bool) -> None:
    """Print a job's record."""
    record = _read(job_id)
    _show(record, as_json)


@main.command()
@click.argument("job_id")
@click.option("--timeout", default=None, type=float, help="Stop watching after this many seconds.")
def watch(job_id: str, timeout: float | None) -> None:
    """Follow a job's events with a progress bar until it ends."""
    from tasks.watch import follow_with_bar

    client = _client()
    _read(job_id, client)
    record = follow_with_bar(client, job_id, timeout)
    if not record.terminal:
        fail(f"job {job_id} is still {record.status.value}", TIMED_OUT)
    render.console().print(render.record_table(record))
    sys.exit(_exit_for(record))


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    client = _client()
    _read(job_id, client)
    record = client.cancel(job_id)
    if record.status is JobStatus.cancelled:
        click.echo(f"{job_id} cancelled")
    elif record.terminal:
        click.echo(f"{job_id} already {record.status.value}")
    else:
        click.echo(f"{job_id} is {record.status.value}: it stops at its next stage")


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
def ls(as_json: bool) -> None:
    """List workers and their resident models."""
    workers = _client().workers()
    if as_json:
        click.echo(json.dumps([w.model_dump(mode="json") for w in workers], indent=2))
    else:
        render.console().print(render.workers_table(workers))


@main.command()
def schema() -> None:
    """Print the JSON Schema of jobs, records and events."""
    from tasks.schema_doc import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.option("--device", "devices", multiple=True,
              help="Worker device (repeat); default: one per visible GPU, else one cpu worker.")
@click.option("--capacity", default=None, help="Bytes each worker may fill, e.g. 2GiB.")
@click.option("--metrics-port", default=None, type=int,
              help="First worker's metrics port; the next workers take the ports after it.")
def up(devices: tuple[str, ...], capacity: str | None, metrics_port: int | None) -> None:
    """Embedded Redis and one worker per visible device, until Ctrl-C."""
    from tasks.up import run_up

    args = ("--capacity", capacity) if capacity else ()
    try:
        sys.exit(run_up(settings_of_command(), list(devices) or None, args, metrics_port=metrics_port))
    except RuntimeError as exc:
        fail(str(exc), FAILED)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def gateway(host: str, port: int) -> None:
    """The HTTP API (OpenAPI at /docs) for platforms that don't speak Celery."""
    import uvicorn

    from tasks.gateway import create_gateway
    from tasks.tenants import load_tenants

    settings = settings_of_command()
    uvicorn.run(create_gateway(settings, tenants=load_tenants(settings.tenants_file)), host=host,
                port=port, log_config=None)


def _read(job_id: str, client: Any = None) -> JobRecord:
    try:
        return (client or _client()).status(job_id)
    except JobNotFound as exc:
        fail(exc.message, INVALID)
    except ModelqError as exc:
        fail(exc.message, UNREACHABLE if isinstance(exc, BrokerUnavailable) else FAILED)
    except Exception as exc:  # redis.ConnectionError and kin
        fail(f"cannot read job {job_id}: {exc}", UNREACHABLE)


if __name__ == "__main__":
    main()
