"""Bounds on every string a job carries, and how errors quote them (no torch here).

Each limit is stated once here and used twice: by the validators in schemas/ and by
the JSON Schema that `modelq schema` prints (schemas/job_schema.py), so that a
producer validating with the schema gets the server's verdict. Patterns are written
without `\\w`, `\\d` or `\\s` (whose meaning differs between regex engines) and are
matched whole: `re.fullmatch(BODY)` here, `^(?:BODY)$` in the schema.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

MAX_PATH = 4096  # characters (code points): JSON Schema counts characters, not bytes
MAX_REPO_PART = 96  # the hub's limit on a namespace and on a name
MAX_REPO_ID = 2 * MAX_REPO_PART + 1
MAX_REVISION = 255
MAX_NAME = 64  # adapter names, tenants
MAX_MODEL_KEY = 64
MAX_TASK_NAME = 128
MAX_MODULE = 256  # a module path such as 'model.layers.0.self_attn.q_proj'
MAX_SIZE_TEXT = 32  # '30GiB'
MAX_KWARG_NAME = 128
MAX_ADAPTERS = 32
MAX_SKIP_MODULES = 64
MAX_MEMORY_ENTRIES = 64
MAX_DEVICE_MAP_ENTRIES = 1024
MAX_RUN_ITEMS = 1024  # a run job's positional args, and its keyword args
MAX_DEVICE_INDEX = 9999
MAX_BYTES = 2**63 - 1  # a byte budget
MAX_SECONDS = 10**7  # any duration (about 115 days)
MAX_INT8_THRESHOLD = 10**4
MAX_RUN_ARGUMENTS_BYTES = 2**20  # a run job's args and kwargs, as compact JSON
MAX_JSON_DEPTH = 32  # arrays and objects nested in one item of a run job's args or kwargs
MAX_JOB_ID = 128  # an envelope's job id (the client's are 32 hex digits)
MAX_JOB_BYTES = 4 * 2**20  # a job's (or an envelope's) JSON text, as received

CONTROL = "[\u0000-\u001f\u007f-\u009f]"
"""C0 controls (NUL, newline, tab...), DEL and C1 controls: refused in every string field."""

_CONTROL = re.compile(CONTROL)
QUOTE_CHARS = 40


def short(value: object, limit: int = QUOTE_CHARS) -> str:
    """`value` as an error message quotes it: repr-escaped, at most `limit` characters of it."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + "..."
    text = repr(value)
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def check_text(value: str, what: str, max_length: int) -> str:
    """`value` if it is at most `max_length` characters and holds no control character."""
    if len(value) > max_length:
        raise ValueError(f"{what} {short(value)} is {len(value)} characters, over the limit of {max_length}")
    if _CONTROL.search(value):
        raise ValueError(f"{what} {short(value)} cannot contain control characters (newline, tab, NUL...)")
    return value


def check_pattern(value: str, what: str, max_length: int, body: str, rule: str) -> str:
    """`value` if it is bounded, free of control characters and matches `body` whole."""
    check_text(value, what, max_length)
    if not re.fullmatch(body, value):
        raise ValueError(f"{what} {short(value)} {rule}")
    return value


MAX_PROBLEMS = 5
MAX_MESSAGE = 300


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line per problem, 'field.path: what to change', for the first
    few problems; never more than a short, escaped prefix of the input."""
    errors = exc.errors(include_url=False, include_input=False, include_context=True)
    lines = []
    for err in errors[:MAX_PROBLEMS]:
        where = ".".join(_where(p) for p in err["loc"] if not str(p).startswith("function-"))
        if err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            field = str(ctx.get("discriminator", "tag")).strip("'")
            message = f"{field} {short(ctx.get('tag'))} must be one of {ctx.get('expected_tags')}"
        else:
            message = _clip(str(err["msg"]).removeprefix("Value error, "))
        lines.append(f"{where}: {message}" if where else message)
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(lines)


def _where(part: str | int) -> str:
    if isinstance(part, int) or (len(part) <= QUOTE_CHARS and part.isprintable()):
        return str(part)
    return short(part)


def _clip(message: str) -> str:
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[:MAX_MESSAGE])
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."
