"""The `modelq` command line (no torch): the group, and the commands that read the pool
and records. Job commands live in tasks/cli/jobs.py and tasks/cli/run.py; what they share
in tasks/cli/common.py.

The worker side's commands (`modelq worker`, `modelq demo`) are found through the
`modelq.commands` entry-point group and loaded only when named: this layer never
imports worker/.

Schemas, the client and rich are imported by the commands that use them: `modelq ls` must
answer within a second at 2,048 workers as a fresh process, and importing them costs ~0.2 s.

Exit codes: 0 succeeded, 1 the job failed or was cancelled, 2 the input was invalid
(nothing was enqueued), 3 timed out waiting, 4 Redis unreachable (nothing enqueued).
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from tasks.cli import evaluate as cli_eval
from tasks.cli import jobs as cli_jobs
from tasks.cli import run as cli_run
from tasks.cli import train as cli_train
from tasks.cli.common import (
    FAILED,
    INVALID,
    TIMED_OUT,
    UNREACHABLE,
    client_of_command,
    exit_for,
    fail,
    settings_of_command,
    show,
)
from tasks.settings import Settings

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from schemas import JobRecord

COMMANDS_GROUP = "modelq.commands"
"""Entry-point group of commands registered by other layers (the worker's: worker, demo)."""


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
    from importlib.metadata import entry_points

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
        from schemas.jobs import describe

        fail(f"settings: {describe(exc)} (check the MODELQ_* environment variables)", INVALID)
    ctx.obj = settings
    logs.configure(logging.WARNING - 10 * verbose, as_json=settings.log_json)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str, as_json: bool) -> None:
    """Print a job's record."""
    record = _read(job_id)
    show(record, as_json)


@main.command()
@click.argument("job_id")
@click.option("--timeout", default=None, type=float, help="Stop watching after this many seconds.")
def watch(job_id: str, timeout: float | None) -> None:
    """Follow a job's events with a progress bar until it ends."""
    from tasks.cli.watch import follow_with_bar

    client = client_of_command()
    _read(job_id, client)
    record = follow_with_bar(client, job_id, timeout)
    if not record.terminal:
        fail(f"job {job_id} is still {record.status.value}", TIMED_OUT)
    from tasks.cli import render

    render.console().print(render.record_table(record))
    sys.exit(exit_for(record))


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    from schemas import JobStatus

    client = client_of_command()
    _read(job_id, client)
    record = client.cancel(job_id)
    if record.status is JobStatus.cancelled:
        click.echo(f"{job_id} cancelled")
    elif record.terminal:
        click.echo(f"{job_id} already {record.status.value}")
    else:
        click.echo(f"{job_id} is {record.status.value}: it stops at its next stage")


SMALL_POOL = 8
"""Up to this many workers, `modelq ls` lists them all after the summary."""


@main.command(name="ls")
@click.option("--all", "show_all", is_flag=True,
              help="List every worker and resident model after the summary.")
@click.option("--json", "as_json", is_flag=True, help="Every worker's entry, as JSON.")
def ls(show_all: bool, as_json: bool) -> None:
    """Summarize the pool: workers by device and state, models by base, free bytes.

    A pool of up to 8 workers is listed in full as tables; `--all` lists any pool in full,
    a line per worker and per model.
    """
    import shutil

    import redis

    from tasks.cli import render
    from tasks.cli.pool_listing import read_pool
    from tasks.cli.pool_summary import summarize, summary_lines

    if as_json:  # the full entries, validated: what scripts read
        click.echo(json.dumps([w.model_dump(mode="json") for w in client_of_command().workers()],
                              indent=2))
        return
    settings = settings_of_command()
    gc.disable()  # this process ends soon: don't walk its ~50,000 fresh objects again and again
    try:
        workers = read_pool(settings)
    except redis.RedisError as exc:
        fail(f"cannot read the pool from Redis: {exc}", UNREACHABLE)
    except ValueError as exc:
        fail(str(exc), FAILED)
    summary = summarize(workers, 2 * settings.heartbeat_seconds + 1)
    click.echo("\n".join(summary_lines(summary, shutil.get_terminal_size().columns)))
    if len(workers) <= SMALL_POOL:
        render.console().print(render.workers_table(workers))
    elif show_all:  # plain lines: a table of thousands of rows takes seconds to lay out
        click.echo("\n".join(render.workers_lines(workers)))


@main.command()
def schema() -> None:
    """Print the JSON Schema of jobs, records and events."""
    from tasks.cli.schema_doc import json_schema

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
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback it needs tenant keys (MODELQ_TENANTS_FILE).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--allow-unauthenticated", is_flag=True,
              help="Listen beyond loopback with no API keys: anyone who reaches the port submits jobs.")
def gateway(host: str, port: int, allow_unauthenticated: bool) -> None:
    """The HTTP API (OpenAPI at /docs) for platforms that don't speak Celery."""
    import uvicorn

    from schemas import ModelqError
    from tasks.gateway.api import create_gateway
    from tasks.tenants import load_tenants

    settings = settings_of_command()
    try:
        tenants = load_tenants(settings.tenants_file)
    except ModelqError as exc:
        fail(exc.message, INVALID)
    if not tenants.multi and not _loopback(host) and not allow_unauthenticated:
        fail(f"refusing to listen on {host} without API keys: anyone who reaches it could load "
             "models and run jobs. Set MODELQ_TENANTS_FILE (each tenant's key is its API key), "
             "listen on 127.0.0.1, or pass --allow-unauthenticated if the network is yours alone",
             INVALID)
    where = f"[{host}]" if ":" in host else host
    click.echo(f"modelq gateway on http://{where}:{port} (OpenAPI at /docs)"
               + ("" if tenants.multi else "; no API keys (single tenant)"))
    # Event streams end only with their job: give followers 5 s to go, then stop anyway.
    uvicorn.run(create_gateway(settings, tenants=tenants), host=host, port=port, log_config=None,
                timeout_graceful_shutdown=5)


def _loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve beyond this machine


def _read(job_id: str, client: Any = None) -> JobRecord:
    from schemas import BrokerUnavailable, JobNotFound, ModelqError

    try:
        record: JobRecord = (client or client_of_command()).status(job_id)
        return record
    except JobNotFound as exc:
        fail(exc.message, INVALID)
    except ModelqError as exc:
        fail(exc.message, UNREACHABLE if isinstance(exc, BrokerUnavailable) else FAILED)
    except Exception as exc:  # redis.ConnectionError and kin
        fail(f"cannot read job {job_id}: {exc}", UNREACHABLE)


for command in (*cli_jobs.COMMANDS, *cli_run.COMMANDS, *cli_eval.COMMANDS, *cli_train.COMMANDS):
    main.add_command(command)


if __name__ == "__main__":
    main()
