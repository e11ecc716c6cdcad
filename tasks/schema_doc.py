"""The JSON Schema of modelq's wire contracts, for producers in other languages (no torch)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from schemas import (
    AttachAdapterJob,
    Envelope,
    Event,
    JobRecord,
    LoadJob,
    RunJob,
    RunResult,
    UnloadJob,
    WorkerInfo,
)


def json_schema() -> dict[str, Any]:
    """One document: each contract's schema under its name."""
    models = {"LoadJob": LoadJob, "AttachAdapterJob": AttachAdapterJob, "UnloadJob": UnloadJob,
              "RunJob": RunJob, "RunResult": RunResult,
              "Envelope": Envelope, "JobRecord": JobRecord, "Event": Event, "WorkerInfo": WorkerInfo}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "modelq",
            "definitions": {name: TypeAdapter(model).json_schema() for name, model in models.items()}}
