"""modelq contracts: job payloads, records, events and errors (pydantic only, no torch)."""

from schemas.base import SCHEMA_VERSION
from schemas.errors import (
    AccessDenied,
    AdapterIncompatible,
    BrokerUnavailable,
    Cancelled,
    InsufficientMemory,
    InvalidJob,
    JobNotFound,
    LoadFailed,
    ModelNotFound,
    ModelqError,
    QuotaExceeded,
    RemoteCodeNotAllowed,
    ResultTooLarge,
    TaskFailed,
    TaskNotFound,
    TimedOut,
    UnsafeWeights,
    UnsupportedModel,
    WorkerLost,
)
from schemas.jobs import (
    AdapterSpec,
    AttachAdapterJob,
    Envelope,
    Job,
    JobKind,
    LoadJob,
    ModelTarget,
    RunJob,
    UnloadJob,
    decode_envelope,
    parse_job,
)
from schemas.records import (
    ACTIVE,
    TERMINAL,
    BaseModelInfo,
    ErrorInfo,
    Event,
    JobRecord,
    JobStatus,
    ModelInfo,
    Progress,
    RunResult,
    Stage,
)
from schemas.refs import ModelRef, validate_repo_id
from schemas.registry import ResidentModel, WorkerInfo
from schemas.specs import DType, PlacementSpec, QuantizationSpec, QuantMethod, parse_bytes

__all__ = [
    "ACTIVE", "SCHEMA_VERSION", "TERMINAL", "AccessDenied", "AdapterIncompatible",
    "AdapterSpec", "AttachAdapterJob", "BaseModelInfo", "BrokerUnavailable", "Cancelled",
    "DType", "Envelope", "ErrorInfo", "Event", "InsufficientMemory", "InvalidJob",
    "Job", "JobKind", "JobNotFound", "JobRecord", "JobStatus", "LoadFailed", "LoadJob",
    "ModelInfo", "ModelNotFound", "ModelRef", "ModelTarget", "ModelqError", "PlacementSpec",
    "Progress", "QuantMethod", "QuantizationSpec", "QuotaExceeded", "RemoteCodeNotAllowed",
    "ResidentModel", "ResultTooLarge", "RunJob", "RunResult", "Stage", "TaskFailed", "TaskNotFound",
    "TimedOut", "UnloadJob", "UnsafeWeights", "UnsupportedModel", "WorkerInfo", "WorkerLost",
    "decode_envelope", "parse_bytes", "parse_job", "validate_repo_id",
]
