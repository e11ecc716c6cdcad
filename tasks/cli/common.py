"""What the `modelq` commands share: exit codes, the command's Settings and Client, errors,
and submitting a job and reporting how it ended (no torch). Schemas, the client and rich
are imported where used: every command imports this module, and `modelq ls` must start fast."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from tasks.settings import Settings

if TYPE_CHECKING:
    from schemas import JobRecord

F = TypeVar("F", bound=Callable[..., Any])
OK, FAILED, INVALID, TIMED_OUT, UNREACHABLE = 0, 1, 2, 3, 4
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def tenant_option() -> Callable[[F], F]:
    """--tenant, defaulting to MODELQ_TENANT, else the default tenant."""
    return click.option("--tenant", default=lambda: os.environ.get("MODELQ_TENANT", "default"),
                        help="Tenant the job is for (default: MODELQ_TENANT, else 'default').")


def settings_of_command() -> Settings:
    """The one Settings of this command, built by `main` (flags over MODELQ_* variables)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Settings) else Settings()


def client_of_command() -> Any:
    from tasks.client import Client

    return Client(settings_of_command())


def fail(message: str, code: int) -> NoReturn:
    from tasks.cli import render

    render.console(stderr=True).print(f"[red]error:[/red] {message}")
    sys.exit(code)


def exit_for(record: JobRecord) -> int:
    from schemas import JobStatus

    return OK if record.status is JobStatus.succeeded else FAILED


def local_ref(value: str) -> str:
    """A ref as typed: an existing relative folder becomes absolute; else as given."""
    if os.path.isdir(value) and not value.startswith(("/", "~")):
        return os.path.abspath(value)
    return value


def adapter_arg(value: str) -> dict[str, Any]:
    head, sep, tail = value.rpartition(":")
    if sep and head and _ADAPTER_NAME.fullmatch(tail):
        return {"ref": local_ref(head), "name": tail}
    return {"ref": local_ref(value)}


def show(record: JobRecord, as_json: bool) -> None:
    if as_json:
        click.echo(record.model_dump_json(indent=2))
    else:  # plain text: rich is not imported for it (a fresh `modelq status` stays quick)
        from tasks.cli import render

        click.echo(render.record_text(record, bold=_styled(sys.stdout)))


def _styled(stream: Any) -> bool:
    """Whether to print bold keys, as rich decided it: a terminal, NO_COLOR unset, TERM not dumb."""
    return (stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM", "") != "dumb")


def submit(job: dict[str, Any]) -> Any:
    """Validate and submit `job`; exit 2 (invalid, refused) or 4 (Redis away) with nothing enqueued."""
    from schemas import (
        AccessDenied,
        BrokerUnavailable,
        InvalidJob,
        ModelNotFound,
        QuotaExceeded,
        TaskNotFound,
        parse_job,
    )

    try:
        return client_of_command().submit(parse_job(job))
    except InvalidJob as exc:
        fail(f"invalid job: {exc.message}", INVALID)
    except BrokerUnavailable as exc:
        fail(exc.message, UNREACHABLE)
    except (ModelNotFound, AccessDenied, QuotaExceeded, TaskNotFound) as exc:  # nothing enqueued
        fail(exc.message, INVALID)


def submit_and_report(job: dict[str, Any], wait: bool, timeout: float | None, as_json: bool) -> None:
    """Submit `job`; print its id (or record), or wait and exit with how it ended."""
    from schemas import TimedOut

    handle = submit(job)
    if not wait:
        if as_json:
            show(handle.status(), True)
        else:
            click.echo(handle.job_id)
        return
    try:
        record = handle.wait(timeout=timeout)
    except TimedOut as exc:
        if as_json:
            show(handle.status(), True)
        fail(exc.message, TIMED_OUT)
    show(record, as_json)
    sys.exit(exit_for(record))


