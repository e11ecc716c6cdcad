"""Names, keys and durations a job carries, and their rules (no torch here).

Each pattern is matched whole here and stated as `^(?:PATTERN)$` in the JSON Schema
(schemas/job_schema.py), so both say the same.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from schemas.text import MAX_MODEL_KEY, MAX_NAME, MAX_SECONDS, MAX_TASK_NAME, check_pattern

# Patterns matched whole, the same in the JSON Schema (schemas/job_schema.py).
NAME = r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}"
TENANT = r"[a-z0-9][a-z0-9_\-]{0,63}"
MODEL_KEY = r"[0-9a-f]{16,64}"
TASK = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+"
COMMIT = r"[0-9a-f]{40}"
Seconds = Annotated[float, Field(strict=True, gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
"""A duration: more than 0, at most MAX_SECONDS, a JSON number (not a string, not a bool)."""


def check_adapter_name(name: str) -> str:
    return check_pattern(name, "adapter name", MAX_NAME, NAME,
                         "must be 1-64 letters, digits, '_' or '-', starting with a letter or digit")


def check_task_name(name: str) -> str:
    """A task name is dotted, like a Python module path: 'acme.score', 'modelq.generate'."""
    return check_pattern(name, "task name", MAX_TASK_NAME, TASK,
                         "must be a dotted name such as 'acme.score': at least two parts of letters, "
                         f"digits and '_' (not starting with a digit), at most {MAX_TASK_NAME} characters")


def check_tenant(tenant: str) -> str:
    return check_pattern(tenant, "tenant", MAX_NAME, TENANT,
                         "must be 1-64 lowercase letters, digits, '_' or '-'")


def check_model_key(value: str) -> str:
    return check_pattern(value, "model key", MAX_MODEL_KEY, MODEL_KEY,
                         "must be the hex key a load job reported")
