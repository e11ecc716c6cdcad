"""The JSON Schema of modelq's wire contracts, for producers in other languages (no torch).

One draft 2020-12 document: its root validates a job (any kind, told apart by `kind`),
with the verdict of `schemas.parse_job`; every contract is a named definition under
`$defs` (`#/$defs/LoadJob`, `#/$defs/JobRecord`, `#/$defs/Event`, `#/$defs/ErrorType`...),
and every `$ref` resolves within the document.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from schemas import Envelope, Event, JobRecord, RunResult, WorkerInfo
from schemas.errors import ERROR_TYPES
from schemas.job_schema import job_definitions, job_root

SCHEMA_ID = "https://modelq.dev/schemas/modelq.json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _error_types() -> dict[str, Any]:
    return {"enum": sorted(ERROR_TYPES), "description": "The stable `type` of an ErrorInfo. Retryable: "
            + ", ".join(sorted(name for name, cls in ERROR_TYPES.items() if cls.retryable)) + "."}


def json_schema() -> dict[str, Any]:
    """The document `modelq schema` prints."""
    _, generated = models_json_schema(
        [(model, "serialization") for model in (Envelope, JobRecord, Event, RunResult, WorkerInfo)],
        ref_template="#/$defs/{model}")
    # Records, events and envelopes as pydantic states them; the jobs inside them (and the
    # root) as the validators check them, which pydantic's generated schema does not know.
    definitions = {**generated.get("$defs", {}), **job_definitions(), "ErrorType": _error_types()}
    return {"$schema": DIALECT, "$id": SCHEMA_ID, "title": "modelq job",
            "description": "A job a producer submits (the root), and every modelq contract under $defs.",
            **job_root(), "$defs": definitions}
