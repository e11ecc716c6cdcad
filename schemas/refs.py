"""Model references: a hub repo id (validated as the hub validates it) or a local path.

No torch, no huggingface_hub here: producers validate with pydantic alone. Every rule
here is also stated in the JSON Schema (schemas/job_schema.py) with the same patterns.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import model_validator

from schemas.base import Contract
from schemas.text import MAX_PATH, MAX_REPO_ID, MAX_REVISION, check_pattern, check_text, short

# The hub's own rule (huggingface_hub.utils.validate_repo_id), restated so that a
# producer needs nothing but pydantic: each part starts and ends with a letter, digit
# or '_' (the hub's word boundaries), at most 96 characters; no '--' or '..'; no '.git' end.
REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
REPO_ID = rf"(?:{REPO_PART}/)?{REPO_PART}"
REPO_ID_FORBIDDEN = r"--|\.\.|\.git$"
REVISION = r"[A-Za-z0-9_.\-/]{1,255}"
LOCAL_PATH = r"(?:/|\./|\.\./|~)[\s\S]*|\.\.?"
"""A local folder: absolute, or starting with './', '../' or '~', or '.' or '..'."""


def validate_repo_id(repo_id: str) -> str:
    """Return `repo_id` if the hub would accept it, else raise ValueError saying why."""
    check_text(repo_id, "repo id", MAX_REPO_ID)
    if repo_id.count("/") > 1:
        raise ValueError(
            f"repo id {short(repo_id)} must be 'name' or 'namespace/name'; "
            "for a local folder give an absolute path or one starting with './'"
        )
    if not re.fullmatch(REPO_ID, repo_id):
        raise ValueError(
            f"repo id {short(repo_id)} may use only letters, digits, '-', '_' and '.', "
            "cannot start or end with '-' or '.', and is at most 96 characters per part"
        )
    if "--" in repo_id or ".." in repo_id:
        raise ValueError(f"repo id {short(repo_id)} cannot contain '--' or '..'")
    if repo_id.endswith(".git"):
        raise ValueError(f"repo id {short(repo_id)} cannot end with '.git'")
    return repo_id


def is_local_path(source: str) -> bool:
    """A ref names a local folder when it is absolute or starts with '.', '~'."""
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


def check_local_path(path: str) -> str:
    return check_pattern(path, "local path", MAX_PATH, LOCAL_PATH,
                         "must be absolute or start with './', '../' or '~'")


class ModelRef(Contract):
    """Where a model or adapter comes from: exactly one of `repo_id` or `path`.

    A plain string is accepted and parsed, as it is (no whitespace trimmed): an
    absolute path or one starting with './', '../' or '~' is a local folder,
    anything else a hub repo id.
    """

    repo_id: str | None = None
    path: str | None = None
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("a model reference cannot be empty")
            return {"path": value} if is_local_path(value) else {"repo_id": value}
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelRef:
        if (self.repo_id is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo_id' or 'path'")
        if self.repo_id is not None:
            validate_repo_id(self.repo_id)
        if self.path is not None:
            check_local_path(self.path)
            if self.revision is not None:
                raise ValueError("'revision' applies to hub repos only, not to a local path")
        if self.revision is not None:
            check_pattern(self.revision, "revision", MAX_REVISION, REVISION,
                          "is not a branch, tag or commit hash")
        return self

    @property
    def display(self) -> str:
        """The ref as a person writes it: `org/name@rev` or the path."""
        if self.path is not None:
            return self.path
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
