"""The JSON Schema (draft 2020-12) of a job, rule for rule what the validators say (no torch here).

Written out rather than generated: pydantic's schema knows the field types but not what
the validators check. Every pattern and limit comes from the module that checks it, so
the two cannot drift apart without tests/test_schema_conformance.py noticing. Strings are
matched whole with `^(?:...)$` and refused with any control character (`not` CONTROL),
which also covers the trailing newline that Python's `$` would let through.

What JSON Schema cannot say, and the server checks all the same, the document carries
as annotations: a job's JSON text is at most MAX_JOB_BYTES, and a run job's args and
kwargs together at most MAX_RUN_ARGUMENTS_BYTES of compact JSON (`x-maxJsonBytes`).
"""

from __future__ import annotations

from typing import Any

from schemas.names import COMMIT, MODEL_KEY, NAME, TASK, TENANT
from schemas.refs import LOCAL_PATH, REPO_ID, REPO_ID_FORBIDDEN, REVISION
from schemas.specs import DEVICE, DEVICE_MAP_STRATEGIES, MODULE, SIZE, DType, QuantMethod
from schemas.text import (
    CONTROL,
    MAX_ADAPTERS,
    MAX_BYTES,
    MAX_DEVICE_INDEX,
    MAX_DEVICE_MAP_ENTRIES,
    MAX_INT8_THRESHOLD,
    MAX_JOB_BYTES,
    MAX_JSON_DEPTH,
    MAX_KWARG_NAME,
    MAX_MEMORY_ENTRIES,
    MAX_MODEL_KEY,
    MAX_MODULE,
    MAX_NAME,
    MAX_PATH,
    MAX_REPO_ID,
    MAX_REVISION,
    MAX_RUN_ARGUMENTS_BYTES,
    MAX_RUN_ITEMS,
    MAX_SECONDS,
    MAX_SIZE_TEXT,
    MAX_SKIP_MODULES,
    MAX_TASK_NAME,
)

Schema = dict[str, Any]
JOB_KINDS = {"load": "LoadJob", "attach": "AttachAdapterJob", "unload": "UnloadJob", "run": "RunJob"}
NULL: Schema = {"type": "null"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/$defs/{name}"}


def text(max_length: int, pattern: str | None = None, refuse: str = CONTROL, **notes: Any) -> Schema:
    """A string of at most `max_length` characters, no control character, matching `pattern` whole."""
    schema: Schema = {"type": "string", "maxLength": max_length, "not": {"pattern": refuse}, **notes}
    if pattern is not None:
        schema["pattern"] = f"^(?:{pattern})$"
    return schema


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, NULL]}


def _values() -> dict[str, Schema]:
    """Strings and numbers: names, refs, devices, sizes, durations."""
    return {
        "RepoId": text(MAX_REPO_ID, REPO_ID, refuse=f"{CONTROL}|{REPO_ID_FORBIDDEN}",
                       description="A hub repo id, 'name' or 'namespace/name', as the hub validates it."),
        "LocalPath": text(MAX_PATH, LOCAL_PATH, description="A folder on the worker: absolute, or "
                          "starting with './', '../' or '~' (at most 4096 characters)."),
        "Revision": text(MAX_REVISION, REVISION, description="A branch, tag or commit of a hub repo."),
        "AdapterName": text(MAX_NAME, NAME),
        "Tenant": text(MAX_NAME, TENANT),
        "ModelKey": text(MAX_MODEL_KEY, MODEL_KEY, description="The hex key a load job reported."),
        "TaskName": text(MAX_TASK_NAME, TASK, description="A dotted task name such as 'acme.score'."),
        "Module": text(MAX_MODULE, MODULE),
        "DeviceName": text(MAX_SIZE_TEXT, DEVICE),
        "Device": {"anyOf": [ref("DeviceName"),
                             {"type": "integer", "minimum": 0, "maximum": MAX_DEVICE_INDEX}]},
        "Size": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_BYTES},
                           text(MAX_SIZE_TEXT, SIZE)],
                 "description": "Bytes, or a size such as '30GiB', '500MB' (units case-insensitive)."},
        "Seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
        "DType": {"enum": [d.value for d in DType]},
        "QuantMethod": {"enum": [m.value for m in QuantMethod]},
    }


def _refs() -> dict[str, Schema]:
    """ModelRef (a string, or exactly one of repo_id and path) and AdapterSpec."""
    only = {"properties": {"path": {"type": "string"}}, "required": ["path"]}
    return {
        "ModelRefString": {"anyOf": [ref("LocalPath"), ref("RepoId")],
                           "description": "A path (absolute, './', '../', '~') or else a hub repo id, "
                                          "taken as it is: no whitespace trimmed."},
        "ModelRef": {"anyOf": [ref("ModelRefString"), {
            "type": "object", "additionalProperties": False,
            "properties": {"repo_id": nullable(ref("RepoId")), "path": nullable(ref("LocalPath")),
                           "revision": nullable(ref("Revision"))},
            "oneOf": [{"properties": {"repo_id": {"type": "string"}}, "required": ["repo_id"]}, only],
            "if": only, "then": {"properties": {"revision": NULL}}}]},
        "AdapterSpec": {"anyOf": [ref("ModelRefString"), {
            "type": "object", "additionalProperties": False, "required": ["ref"],
            "properties": {"ref": ref("ModelRef"), "name": nullable(ref("AdapterName"))}}]},
    }


def _quantization() -> Schema:
    def when(methods: list[str], then: Schema) -> Schema:
        return {"if": {"properties": {"method": {"enum": methods}}}, "then": {"properties": then}}

    options = {"double_quant": NULL, "compute_dtype": NULL, "int8_threshold": NULL,
               "skip_modules": {"maxItems": 0}}
    return {"anyOf": [ref("QuantMethod"), {
        "type": "object", "additionalProperties": False,
        "properties": {
            "method": ref("QuantMethod"),
            "double_quant": {"type": ["boolean", "null"]},
            "compute_dtype": {"enum": [d.value for d in DType if d is not DType.auto] + [None]},
            "int8_threshold": nullable({"type": "number", "exclusiveMinimum": 0,
                                        "maximum": MAX_INT8_THRESHOLD}),
            "skip_modules": {"type": "array", "items": ref("Module"), "maxItems": MAX_SKIP_MODULES}},
        "allOf": [when(["none"], options),  # an absent method is 'none': `properties` holds vacuously
                  when(["none", "int8"], {"double_quant": NULL, "compute_dtype": NULL}),
                  when(["none", "nf4", "fp4"], {"int8_threshold": NULL})]}]}


def _placement() -> Schema:
    device_map = {"anyOf": [NULL, {"enum": sorted(DEVICE_MAP_STRATEGIES)}, ref("DeviceName"), {
        "type": "object", "minProperties": 1, "maxProperties": MAX_DEVICE_MAP_ENTRIES,
        "propertyNames": text(MAX_MODULE, f"(?:{MODULE})?"), "additionalProperties": ref("Device")}]}
    max_memory = nullable({"type": "object", "minProperties": 1, "maxProperties": MAX_MEMORY_ENTRIES,
                           "propertyNames": ref("DeviceName"), "additionalProperties": ref("Size")})
    return {"type": "object", "additionalProperties": False,
            "properties": {"device_map": device_map, "max_memory": max_memory}}


def _job(kind: str, required: list[str], properties: Schema, **more: Any) -> Schema:
    return {"type": "object", "additionalProperties": False, "required": required,
            "properties": {"kind": {"const": kind}, "tenant": ref("Tenant"), **properties}, **more}


def _load_job() -> Schema:
    unnamed = {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"name": NULL}}]}
    pinned = {"anyOf": [ref("LocalPath"), {"type": "object", "required": ["path"],
                                           "properties": {"path": {"type": "string"}}},
                        {"type": "object", "required": ["revision"],
                         "properties": {"revision": {"type": "string", "pattern": f"^(?:{COMMIT})$"}}}]}
    return _job("load", ["model"], {
        "model": ref("ModelRef"), "dtype": ref("DType"), "quantization": ref("QuantizationSpec"),
        "placement": ref("PlacementSpec"),
        "adapters": {"type": "array", "items": ref("AdapterSpec"), "maxItems": MAX_ADAPTERS,
                     "contains": unnamed, "minContains": 0, "maxContains": 1},
        "active_adapter": nullable(ref("AdapterName")),
        "trust_remote_code": {"type": "boolean"}, "pin": {"type": "boolean"},
        "keep_alive_seconds": nullable(ref("Seconds")), "timeout_seconds": nullable(ref("Seconds"))},
        # trust_remote_code on a hub repo needs it pinned to a 40-character commit
        **{"if": {"properties": {"trust_remote_code": {"const": True}}, "required": ["trust_remote_code"]},
           "then": {"properties": {"model": pinned}}})


def _json_values() -> dict[str, Schema]:
    """JsonN: any JSON value nesting at most N arrays and objects (a run job's args, kwargs)."""
    scalar: Schema = {"type": ["null", "boolean", "number", "string"]}
    defs = {"Json0": scalar}
    for depth in range(1, MAX_JSON_DEPTH + 1):
        inner = ref(f"Json{depth - 1}")
        defs[f"Json{depth}"] = {"anyOf": [scalar, {"type": "array", "items": inner},
                                          {"type": "object", "additionalProperties": inner}]}
    return defs


def _run_job() -> Schema:
    value = ref(f"Json{MAX_JSON_DEPTH}")
    names = {"type": "array", "items": ref("AdapterName"), "maxItems": MAX_ADAPTERS, "uniqueItems": True}
    return _job("run", ["task", "model"], {
        "task": ref("TaskName"), "model": ref("ModelTarget"),
        "adapters": {"anyOf": [NULL, ref("AdapterName"), names]},
        "args": {"type": "array", "items": value, "maxItems": MAX_RUN_ITEMS},
        "kwargs": {"type": "object", "maxProperties": MAX_RUN_ITEMS,
                   "propertyNames": text(MAX_KWARG_NAME), "additionalProperties": value},
        "timeout_seconds": nullable(ref("Seconds"))},
        **{"x-maxJsonBytes": {"args+kwargs": MAX_RUN_ARGUMENTS_BYTES}})


def _jobs() -> dict[str, Schema]:
    target = {"type": "object", "additionalProperties": False,
              "properties": {"model_key": nullable(ref("ModelKey")), "load": nullable(ref("LoadJob"))},
              "oneOf": [{"properties": {"model_key": {"type": "string"}}, "required": ["model_key"]},
                        {"properties": {"load": {"type": "object"}}, "required": ["load"]}]}
    return {
        "QuantizationSpec": _quantization(), "PlacementSpec": _placement(), "LoadJob": _load_job(),
        "AttachAdapterJob": _job("attach", ["model_key", "adapter"], {
            "model_key": ref("ModelKey"), "adapter": ref("ModelRef"), "name": ref("AdapterName"),
            "activate": {"type": "boolean"}}),
        "UnloadJob": _job("unload", ["model_key"], {
            "model_key": ref("ModelKey"), "adapter": nullable(ref("AdapterName"))}),
        "ModelTarget": {"anyOf": [ref("ModelKey"), target],
                        "description": "A resident model's key, or a load job to load it first (run "
                                       "as the run job's tenant, whatever tenant it names)."},
        "RunJob": _run_job(),
    }


def job_definitions() -> dict[str, Schema]:
    """Every definition a job's schema refers to, by name (each kind under its class name)."""
    return {**_values(), **_refs(), **_jobs(), **_json_values()}


def job_root() -> Schema:
    """The schema of any job: exactly one kind, told apart by `kind` (required at the root)."""
    return {"oneOf": [{"allOf": [ref(name)], "required": ["kind"]} for name in JOB_KINDS.values()],
            "discriminator": {"propertyName": "kind",
                              "mapping": {k: f"#/$defs/{name}" for k, name in JOB_KINDS.items()}},
            "x-maxJsonBytes": MAX_JOB_BYTES}
