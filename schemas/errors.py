"""The one modelq error hierarchy, shared by producers and workers (no torch here).

Every error has a stable `type` name (the class name) that platforms switch on in
`ErrorInfo.type`, says whether trying again may help (`retryable`), carries a
message that says what to change, and pickles across processes. Third-party
errors are translated into these in one place: `worker/errors.py`.
"""

from __future__ import annotations

from typing import Any


class ModelqError(Exception):
    """Root of every error modelq raises on purpose."""

    retryable = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self).__name__, self.message, self.details))

    @property
    def type(self) -> str:
        return type(self).__name__


# --- the request itself is wrong: fix the job, then resubmit ---------------------

class InvalidJob(ModelqError, ValueError):
    """The job does not validate; nothing was enqueued."""


class ModelNotFound(ModelqError, FileNotFoundError):
    """The repo, revision, folder or its weights do not exist."""


class UnsafeWeights(ModelqError):
    """Only pickle checkpoints (.bin/.pt) were found; safetensors are required."""


class RemoteCodeNotAllowed(ModelqError, PermissionError):
    """The model needs custom code from its repo and the job did not allow it."""


class UnsupportedModel(ModelqError):
    """The architecture is unknown to transformers or not a causal LM."""


class AdapterIncompatible(ModelqError):
    """The adapter was trained on another base, or its modules don't match."""


# --- run jobs: the task itself ----------------------------------------------------

class TaskNotFound(ModelqError, LookupError):
    """No task of this name is registered on the worker (`modelq worker --tasks MODULE`)."""


class TaskFailed(ModelqError):
    """The task raised an exception, or returned something that is not JSON.

    `details` carry `task`, `exception_type` and `exception_message`; the traceback
    is in the worker's log, not in the record.
    """


class ResultTooLarge(ModelqError):
    """The task's result, as JSON, is over the size limit (`details`: `size`, `limit` in bytes)."""


# --- permissions and quotas --------------------------------------------------------

class AccessDenied(ModelqError, PermissionError):
    """The tenant may not read, use or change this job, model or path."""


class QuotaExceeded(ModelqError):
    """A tenant quota (bytes, models, jobs) would be exceeded."""

    retryable = True


# --- the pool ----------------------------------------------------------------------

class InsufficientMemory(ModelqError, MemoryError):
    """The device cannot fit the model even after evicting idle models."""

    retryable = True


class WorkerLost(ModelqError):
    """The worker died while running the job, too many times."""

    retryable = True


class TimedOut(ModelqError, TimeoutError):
    """The job ran past its time limit, or waiting for it did."""

    retryable = True


class JobNotFound(ModelqError, KeyError):
    """No record exists for this job id (or it expired)."""

    def __str__(self) -> str:
        return self.message


class BrokerUnavailable(ModelqError, ConnectionError):
    """Redis could not be reached; nothing was enqueued."""

    retryable = True


class Cancelled(ModelqError):
    """The job was cancelled before it finished."""


class HubUnavailable(ModelqError, ConnectionError):
    """The hub could not be reached (network down, timeout) and the worker's cache lacks the files."""

    retryable = True


class LoadFailed(ModelqError):
    """Anything else that went wrong while loading."""

    retryable = True


ERROR_TYPES: dict[str, type[ModelqError]] = {
    cls.__name__: cls
    for cls in (ModelqError, InvalidJob, ModelNotFound, UnsafeWeights, RemoteCodeNotAllowed,
                UnsupportedModel, AdapterIncompatible, AccessDenied, QuotaExceeded,
                InsufficientMemory, WorkerLost, TimedOut, JobNotFound, BrokerUnavailable,
                Cancelled, LoadFailed, TaskNotFound, TaskFailed, ResultTooLarge, HubUnavailable)
}


def _rebuild(type_name: str, message: str, details: dict[str, Any]) -> ModelqError:
    return ERROR_TYPES.get(type_name, ModelqError)(message, **details)


def error_from(type_name: str, message: str, **details: Any) -> ModelqError:
    """The error class named `type_name` (the base class for unknown names)."""
    return _rebuild(type_name, message, details)
