"""Model references: a hub repo id (validated as the hub validates it) or a local path.

No torch, no huggingface_hub here: producers validate with pydantic alone.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import model_validator

from schemas.base import Contract

# The hub's own rule (huggingface_hub.utils.validate_repo_id), restated so that a
# producer needs nothing but pydantic.
_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", flags=re.ASCII)
_REVISION = re.compile(r"[\w\-./]{1,255}", flags=re.ASCII)


def validate_repo_id(repo_id: str) -> str:
    """Return `repo_id` if the hub would accept it, else raise ValueError saying why."""
    if repo_id.count("/") > 1:
        raise ValueError(
            f"repo id {repo_id!r} must be 'name' or 'namespace/name'; "
            "for a local folder give an absolute path or one starting with './'"
        )
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(
            f"repo id {repo_id!r} may use only letters, digits, '-', '_' and '.', "
            "cannot start or end with '-' or '.', and is at most 96 characters per part"
        )
    if "--" in repo_id or ".." in repo_id:
        raise ValueError(f"repo id {repo_id!r} cannot contain '--' or '..'")
    if repo_id.endswith(".git"):
        raise ValueError(f"repo id {repo_id!r} cannot end with '.git'")
    return repo_id


def is_local_path(source: str) -> bool:
    """A ref names a local folder when it is absolute or starts with '.', '~'."""
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


class ModelRef(Contract):
    """Where a model or adapter comes from: exactly one of `repo_id` or `path`.

    A plain string is accepted and parsed: an absolute path or one starting with
    './', '../' or '~' is a local folder, anything else a hub repo id.
    """

    repo_id: str | None = None
    path: str | None = None
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            source = value.strip()
            if not source:
                raise ValueError("a model reference cannot be empty")
            return {"path": source} if is_local_path(source) else {"repo_id": source}
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelRef:
        if (self.repo_id is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo_id' or 'path'")
        if self.repo_id is not None:
            validate_repo_id(self.repo_id)
        if self.path is not None:
            if not is_local_path(self.path):
                raise ValueError(
                    f"local path {self.path!r} must be absolute or start with './' or '~'"
                )
            if self.revision is not None:
                raise ValueError("'revision' applies to hub repos only, not to a local path")
        if self.revision is not None and not _REVISION.fullmatch(self.revision):
            raise ValueError(f"revision {self.revision!r} is not a branch, tag or commit hash")
        return self

    @property
    def display(self) -> str:
        """The ref as a person writes it: `org/name@rev` or the path."""
        if self.path is not None:
            return self.path
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
