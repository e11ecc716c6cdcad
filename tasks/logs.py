"""Logging setup for entry points, and the job context every log line carries (no torch).

Only entry points call `configure`. The worker names itself once (`set_worker`);
the runner's observer sets the job id and tenant while a job runs (`JobContext`).
Both plain and JSON lines read them from context variables, so library code just
logs with `logging.getLogger(__name__)` and %-style arguments. Text lines escape control
characters (a path with a newline in it cannot forge a line); JSON lines are safe as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # every `modelq` command configures logging: it starts without schemas
    from schemas import JobRecord

_job_id: ContextVar[str | None] = ContextVar("modelq_job_id", default=None)
_tenant: ContextVar[str | None] = ContextVar("modelq_tenant", default=None)
_worker: str | None = None  # one worker per process

THIRD_PARTY = ("bitsandbytes", "transformers", "peft", "accelerate", "torch", "huggingface_hub",
               "safetensors", "tokenizers", "urllib3", "httpx", "filelock")
"""Libraries whose warnings (logged or `warnings.warn`) users see only with `-v`: they are
about the library's own set-up ("Failed to load CPU gemm_4bit_forward", deprecations), not
the user's jobs; their errors always show."""

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job)s: %(message)s"


def set_worker(name: str | None) -> None:
    """Name this process's worker; every later line carries it."""
    global _worker
    _worker = name


def set_job(job_id: str | None, tenant: str | None = None) -> None:
    _job_id.set(job_id)
    _tenant.set(tenant)


def context() -> dict[str, str]:
    """The job id, tenant and worker in effect here (only those that are set)."""
    values = {"job_id": _job_id.get(), "tenant": _tenant.get(), "worker": _worker}
    return {k: v for k, v in values.items() if v}


class JobContext:
    """A run observer (worker/jobs/runner.py) that puts the running job in every log line."""

    def job_started(self, record: JobRecord) -> None:
        set_job(record.job_id, record.tenant)

    def job_ended(self, record: JobRecord) -> None:
        set_job(None)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in context().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        job = getattr(record, "job_id", None)
        record.job = f" [{job}]" if job else ""
        return True


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` with every control character (line breaks, tabs, escape codes) written as an
    escape (`\\n`, `\\x1b`), so what a job names cannot start a line of its own in a log."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode()),
                        text)


class PlainFormatter(logging.Formatter):
    """The text format: one line per record, whatever the message holds. A traceback keeps
    its lines, each indented and escaped, so none of them can pass for a record."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job_id, tenant, worker, exc."""

    FIELDS = ("job_id", "tenant", "worker")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: int = logging.WARNING, as_json: bool = False) -> None:
    """Install one stderr handler on the root logger (entry points only)."""
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if as_json else PlainFormatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet_third_party(verbose=level <= logging.INFO)


def quiet_third_party(verbose: bool) -> None:
    """THIRD_PARTY loggers at ERROR and their `warnings.warn` ignored, unless `verbose`.

    transformers logs through a handler of its own (no propagation), set up from
    TRANSFORMERS_VERBOSITY when it is first imported: that is set too, unless the user did.
    """
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if verbose:
        return
    names = "|".join(THIRD_PARTY)
    warnings.filterwarnings("ignore", module=rf"({names})(\.|$)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported already: its verbosity was read
        sys.modules["transformers"].logging.set_verbosity_error()
