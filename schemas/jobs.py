"""Job payloads producers send, and the one function workers decode them with (no torch)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    Field,
    JsonValue,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.base import Contract, Versioned
from schemas.errors import InvalidJob
from schemas.names import COMMIT, TENANT, Seconds, check_model_key
from schemas.names import check_adapter_name as check_adapter_name
from schemas.names import check_task_name as check_task_name
from schemas.names import check_tenant as check_tenant
from schemas.refs import ModelRef
from schemas.specs import DType, PlacementSpec, QuantizationSpec
from schemas.tenants import Signature
from schemas.text import (
    MAX_ADAPTERS,
    MAX_JOB_BYTES,
    MAX_JOB_ID,
    MAX_JSON_DEPTH,
    MAX_KWARG_NAME,
    MAX_NAME,
    MAX_RUN_ARGUMENTS_BYTES,
    MAX_RUN_ITEMS,
    check_text,
)
from schemas.text import describe as describe


class JobKind(str, Enum):
    """What a job asks a worker to do."""

    load = "load"  # load a base model (and adapters) into a worker's cache
    attach = "attach"  # attach an adapter to a resident model
    unload = "unload"  # free a resident model
    run = "run"  # run a named task on a model (loaded first if needed)


class AdapterSpec(Contract):
    """A PEFT adapter to attach, under `name` (default: 'default' for the first)."""

    ref: ModelRef
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"ref": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_adapter_name(value)


class _Job(Contract):
    tenant: str = "default"

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return check_tenant(value)


class LoadJob(_Job):
    """Load `model` (or, for an adapter repo, its base plus the adapter) on a worker.

    `adapters` (at most 32) are attached in order after loading; at most one may go
    without a name (it is named 'default'). `active_adapter` picks the active one
    (default: the last attached). That names are unique and that `active_adapter` is
    among them is checked by the worker (InvalidJob), not here: JSON Schema cannot
    compare one value with another, and the schema gives the server's verdict.
    """

    kind: Literal["load"] = "load"
    model: ModelRef
    dtype: DType = DType.auto
    quantization: QuantizationSpec = QuantizationSpec()
    placement: PlacementSpec = PlacementSpec()
    adapters: tuple[AdapterSpec, ...] = Field(default=(), max_length=MAX_ADAPTERS)
    active_adapter: str | None = None
    trust_remote_code: StrictBool = False
    pin: StrictBool = False  # never evicted to make room; only `modelq unload` frees it
    keep_alive_seconds: Seconds | None = None  # unload after this long unused
    timeout_seconds: Seconds | None = None
    """The longest the worker may spend on this job before failing it as TimedOut
    (default: the worker's max_load_seconds)."""

    @field_validator("adapters", mode="before")
    @classmethod
    def _few(cls, value: Any) -> Any:  # before validating each of a million adapters
        if isinstance(value, (list, tuple)) and len(value) > MAX_ADAPTERS:
            raise ValueError(f"a job attaches at most {MAX_ADAPTERS} adapters, not {len(value)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> LoadJob:
        if len([a for a in self.adapters if a.name is None]) > 1:
            raise ValueError("when attaching several adapters, give each a name ('REF:NAME')")
        if self.active_adapter is not None:
            check_adapter_name(self.active_adapter)
        if self.trust_remote_code and self.model.repo_id is not None and not _is_commit(self.model.revision):
            raise ValueError("trust_remote_code needs the model pinned to a 40-character commit revision")
        return self


class AttachAdapterJob(_Job):
    """Attach `adapter` to the resident model `model_key` under `name`."""

    kind: Literal["attach"] = "attach"
    model_key: str
    adapter: ModelRef
    name: str = "default"
    activate: StrictBool = True

    @field_validator("model_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_model_key(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_adapter_name(value)


class UnloadJob(_Job):
    """Free the resident model `model_key` (with its adapters), or with `adapter`, only that adapter."""

    kind: Literal["unload"] = "unload"
    model_key: str
    adapter: str | None = None

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str | None) -> str | None:
        return None if value is None else check_adapter_name(value)

    @field_validator("model_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_model_key(value)


class ModelTarget(Contract):
    """The model a run job runs on: exactly one of a resident `model_key`, or a `load` job.

    JSON: ``{"model_key": "<hex key>"}`` or ``{"load": {<LoadJob fields>}}``; a bare
    string is read as a model key. A `load` target is loaded first, exactly as that
    load job would be (a cache hit when it is resident already); its tenant is the run
    job's tenant.
    """

    model_key: str | None = None
    load: LoadJob | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_shortcut(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"model_key": value}
        if isinstance(value, LoadJob):
            return {"load": value}
        return value

    @field_validator("model_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return None if value is None else check_model_key(value)

    @model_validator(mode="after")
    def _one(self) -> ModelTarget:
        if (self.model_key is None) == (self.load is None):
            raise ValueError("give the model as exactly one of 'model_key' (a resident model) or "
                             "'load' (a load job's fields)")
        return self


class RunJob(_Job):
    """Run the task named `task` on `model`, with `args` and `kwargs` (JSON), and record its result.

    `adapters` picks the active adapters for the call: None keeps the model's as they
    stand, a name or a list of names activates those, and ``[]`` runs the base alone;
    the model's own activation is restored afterwards.
    """

    kind: Literal["run"] = "run"
    task: str
    model: ModelTarget
    adapters: tuple[str, ...] | None = Field(default=None, max_length=MAX_ADAPTERS)
    args: tuple[JsonValue, ...] = Field(default=(), max_length=MAX_RUN_ITEMS)
    kwargs: dict[str, JsonValue] = Field(default={}, max_length=MAX_RUN_ITEMS)
    timeout_seconds: Seconds | None = None
    """The longest the task may run (with the load, if any) before failing as TimedOut
    (default: the worker's MODELQ_MAX_RUN_SECONDS; unset there too, no limit)."""

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        return check_task_name(value)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        value = dict(value)
        if isinstance(value.get("adapters"), str):
            value["adapters"] = (value["adapters"],)
        for name in ("args", "kwargs"):
            if name in value:
                _check_depth(value[name], name)
                value[name] = _lists(value[name])
        return _with_tenant(value)

    @field_validator("kwargs")
    @classmethod
    def _kwarg_names(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        for name in value:
            check_text(name, "kwargs key", MAX_KWARG_NAME)
        return value

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for name in value:
            check_adapter_name(name)
        if len(value) != len(set(value)):
            raise ValueError("adapter names must be unique")
        return value

    @model_validator(mode="after")
    def _check(self) -> RunJob:
        try:
            size = len(json.dumps([self.args, self.kwargs], separators=(",", ":"), ensure_ascii=False,
                                  allow_nan=False).encode())
        except ValueError:
            raise ValueError("args and kwargs must be JSON: NaN and Infinity are not") from None
        if size > MAX_RUN_ARGUMENTS_BYTES:
            raise ValueError(f"args and kwargs take {size} bytes as JSON, over the limit of "
                             f"{MAX_RUN_ARGUMENTS_BYTES}: pass large inputs as a file path instead")
        return self


def _check_depth(value: Any, name: str) -> None:
    """Each item of args (value of kwargs) nests at most MAX_JSON_DEPTH arrays and objects deep."""
    level = [v for v in (value.values() if isinstance(value, dict) else value)] \
        if isinstance(value, (list, tuple, dict)) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [c for v in level if isinstance(v, (list, tuple, dict))
                 for c in (v.values() if isinstance(v, dict) else v)]
    if any(isinstance(v, (list, tuple, dict)) for v in level):
        raise ValueError(f"{name} nest over {MAX_JSON_DEPTH} arrays and objects deep")


def _lists(value: Any) -> Any:
    """Tuples as lists, all the way down (JSON has arrays only)."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _with_tenant(value: dict[str, Any]) -> dict[str, Any]:
    """A load target runs as the run job's tenant: the tenant it names (if a valid one) is replaced.

    (JSON Schema cannot say that two fields are equal, so a differing tenant is not an error.)
    """
    tenant = value.get("tenant", "default")
    model = value.get("model")
    if isinstance(model, LoadJob):
        model = {"load": model}
    elif isinstance(model, ModelTarget):
        model = {"model_key": model.model_key, "load": model.load}
    if isinstance(model, dict) and isinstance(model.get("load"), LoadJob):
        value["model"] = {**model, "load": model["load"].model_copy(update={"tenant": tenant})}
    elif isinstance(model, dict) and isinstance(model.get("load"), dict) and \
            _valid_tenant(model["load"].get("tenant", "default")):
        value["model"] = {**model, "load": {**model["load"], "tenant": tenant}}
    return value


def _valid_tenant(tenant: Any) -> bool:
    return isinstance(tenant, str) and len(tenant) <= MAX_NAME and re.fullmatch(TENANT, tenant) is not None


def _is_commit(revision: str | None) -> bool:
    return revision is not None and re.fullmatch(COMMIT, revision) is not None


Job = Annotated[LoadJob | AttachAdapterJob | UnloadJob | RunJob, Field(discriminator="kind")]
"""Any job a producer may submit, told apart by its `kind`: the one name for the union."""


class Envelope(Versioned):
    """What travels on the queue: the job, its id, when it was submitted and who signed it."""

    job_id: str = Field(min_length=1, max_length=MAX_JOB_ID)
    submitted_at: datetime
    job: Job
    auth: Signature | None = None  # required by workers that run with a tenants file


_ENVELOPE: TypeAdapter[Envelope] = TypeAdapter(Envelope)
_JOB: TypeAdapter[Job] = TypeAdapter(Job)
T = TypeVar("T")


def parse_job(payload: Any) -> Job:
    """Validate a job dict (or JSON string) from a producer; InvalidJob says what to fix."""
    return _validate(_JOB, payload)


def decode_envelope(payload: Any) -> Envelope:
    """The one way a worker reads a queue message; InvalidJob when it is malformed."""
    return _validate(_ENVELOPE, payload)


def _validate(adapter: TypeAdapter[T], payload: Any) -> T:
    if isinstance(payload, (str, bytes)):
        size = len(payload.encode(errors="surrogatepass") if isinstance(payload, str) else payload)
        if size > MAX_JOB_BYTES:
            raise InvalidJob(f"the job is {size} bytes of JSON, over the limit of {MAX_JOB_BYTES}", size=size)
    try:
        if isinstance(payload, (str, bytes)):
            return adapter.validate_json(payload)
        return adapter.validate_python(payload)
    except ValidationError as exc:
        raise InvalidJob(describe(exc)) from None
