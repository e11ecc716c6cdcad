"""What a job's record and event stream say: status, stage, progress, result, error.

No torch here. `tasks/state/store.py` is the one place records change.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import Discriminator, Field, JsonValue, Tag, model_validator

from schemas.base import Contract, Versioned
from schemas.jobs import Job, JobKind


class JobStatus(str, Enum):
    """Lifecycle of a job."""

    queued = "queued"  # recorded and sent; no worker has started it
    running = "running"  # a worker is on it; `stage` says where
    retrying = "retrying"  # an attempt ended (worker lost, out of memory); it will run again
    succeeded = "succeeded"  # done; `result` holds the ModelInfo (a RunResult for run jobs)
    failed = "failed"  # done; `error` holds the ErrorInfo
    cancelled = "cancelled"  # stopped on request before it finished


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
ACTIVE = frozenset({JobStatus.running, JobStatus.retrying})


class Stage(str, Enum):
    """Where a running job is."""

    resolving = "resolving"  # finding the repo, revision and files
    downloading = "downloading"  # fetching files not yet in the hub cache
    loading = "loading"  # reading weights, quantizing, placing layers
    attaching = "attaching"  # attaching PEFT adapters
    unloading = "unloading"  # freeing a resident model
    running_task = "running_task"  # a run job's task is running on the model


class Progress(Contract):
    """How far the current stage is: a 0..1 fraction, plus bytes where known."""

    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    done: int | None = None
    total: int | None = None
    unit: str = "bytes"


class ErrorInfo(Contract):
    """Why a job failed. `type` is a stable name from schemas.errors."""

    type: str
    message: str
    retryable: bool = False
    details: dict[str, Any] = {}


class BaseModelInfo(Contract):
    """The resolved base model: where it came from, at which revision."""

    ref: str
    revision: str | None = None  # hub commit hash; None for a local folder
    path: str  # the folder the weights were read from
    fingerprint: str | None = None  # local folders: a hash of file names, sizes and times


class ModelInfo(Contract):
    """A resident model as a worker reports it."""

    model_key: str
    model_class: str
    base_model: BaseModelInfo
    num_parameters: int
    footprint_bytes: int
    estimated_bytes: int | None = None  # predicted before loading (worker/models/estimate.py)
    from_artifact: bool = False  # quantized weights read from this host's artifact, not re-quantized
    dtype: str
    quantization: str
    quantized_modules: int = 0  # bitsandbytes Linear layers (8-bit or 4-bit) in the model
    device_map: dict[str, str]  # module prefix -> device, summarised
    adapters: tuple[str, ...] = ()
    active_adapters: tuple[str, ...] = ()
    worker: str | None = None
    device: str | None = None
    cache_hit: bool = False
    pinned: bool = False
    keep_alive_seconds: float | None = None
    load_seconds: float | None = None


class RunResult(Contract):
    """What a run job's task returned, and on which model it ran."""

    model_key: str
    value: JsonValue  # the task's return value, as JSON
    seconds: float  # time spent in the task itself (not loading)
    cache_hit: bool  # the model was resident already (no load before the task)
    model: ModelInfo  # the model as the task used it (its adapters, the adapters active for the call)
    batch_jobs: int = Field(default=1, ge=1)  # run jobs that shared the task's call (1: alone)


def _result_kind(value: Any) -> str:
    """'run' for a RunResult, 'model' for a ModelInfo: a RunResult carries a `value`."""
    if isinstance(value, dict):
        return "run" if "value" in value else "model"
    return "run" if isinstance(value, RunResult) else "model"


Result = Annotated[Annotated[ModelInfo, Tag("model")] | Annotated[RunResult, Tag("run")],
                   Discriminator(_result_kind)]
"""A record's result: a ModelInfo for load, attach and unload jobs, a RunResult for run jobs."""


class JobRecord(Versioned):
    """The state of one job, as stored in Redis and shown by `modelq status`."""

    job_id: str
    kind: JobKind
    tenant: str
    status: JobStatus
    stage: Stage | None = None
    progress: Progress | None = None
    attempt: int = 0
    worker: str | None = None
    device: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    time_limit_seconds: float | None = None
    """The time limit the job runs under, written when it starts: its own `timeout_seconds`,
    else the worker's default for its kind (MODELQ_MAX_LOAD_SECONDS for loads,
    MODELQ_MAX_RUN_SECONDS for run jobs). None: not started, or (a started run job) no limit."""
    result: Result | None = None
    error: ErrorInfo | None = None
    job: Job

    @model_validator(mode="after")
    def _result_fits_kind(self) -> JobRecord:
        if self.result is not None and isinstance(self.result, RunResult) != (self.kind is JobKind.run):
            wanted = "a RunResult" if self.kind is JobKind.run else "a ModelInfo"
            raise ValueError(f"a {self.kind.value} job's result must be {wanted}")
        return self

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class Event(Versioned):
    """One line of a job's event stream."""

    job_id: str
    at: datetime
    status: JobStatus
    stage: Stage | None = None
    progress: Progress | None = None
    message: str | None = None
    worker: str | None = None
    metrics: dict[str, float] | None = None  # e.g. {"loss": 2.31} for a training step
