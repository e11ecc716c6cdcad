"""The gateway's OpenAPI document: the real job bodies, from the schemas (no torch).

Job bodies are read and validated by the gateway itself (`schemas.parse_job`, so its errors
stay modelq's), which leaves FastAPI blind to them; this module documents them: each kind's
endpoint takes its job's schema, POST /v1/jobs the union told apart by `kind`. A schema that
differs from the one FastAPI documents for responses under the same name (a job inside a
JobRecord is rendered for output) is published as `<name>-Input`, as FastAPI itself would.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from schemas import AttachAdapterJob, InvalidJob, LoadJob, RunJob, UnloadJob

JOB_MODELS: dict[str, type[BaseModel]] = {"load": LoadJob, "attach": AttachAdapterJob,
                                          "unload": UnloadJob, "run": RunJob}
_REF = "#/components/schemas/"
_MARK = "__modelq_input__"


def job_body(kind: str | None) -> dict[str, Any]:
    """`openapi_extra` for a submit route: its job's schema (None: any kind)."""
    if kind is not None:
        schema: dict[str, Any] = {"$ref": _REF + JOB_MODELS[kind].__name__ + _MARK}
    else:
        refs = {k: _REF + model.__name__ + _MARK for k, model in JOB_MODELS.items()}
        schema = {"type": "object", "required": ["kind"],
                  "oneOf": [{"$ref": ref} for ref in refs.values()],
                  "discriminator": {"propertyName": "kind", "mapping": refs}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class Documented:
    """Holds a job body to the JSON types the OpenAPI documents for it, after `parse_job` took it.

    parse_job is lenient where pydantic is (`"pin": 0` reads as false); the gateway's published
    contract is not, so a body that the document refuses is refused (422) in the document's words.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._validators: dict[str, Any] = {}

    def check(self, body: dict[str, Any], kind: str) -> None:
        error = next(iter(self._validator(kind).iter_errors(body)), None)
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "body"
            raise InvalidJob(f"{where}: {error.message} (the gateway takes the JSON types its OpenAPI "
                             "documents: see /docs)")

    def _validator(self, kind: str) -> Any:
        if kind not in self._validators:
            from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

            components = self.app.openapi()["components"]
            schema = {**job_body(kind)["requestBody"]["content"]["application/json"]["schema"],
                      "components": components}
            self._validators[kind] = Draft202012Validator(_render(schema, _renamed(components["schemas"])))
        return self._validators[kind]


def _renamed(components: dict[str, Any]) -> set[str]:
    return {name.removesuffix("-Input") for name in components if name.endswith("-Input")}


def install_openapi(app: FastAPI, *, keyless: bool = False) -> None:
    """Make `app.openapi()` publish the job schemas that the submit routes reference.

    `keyless`: the gateway acts for one tenant and needs no key (no tenants file), so each
    secured operation also lists the empty requirement: a key is optional there."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes, tags=app.openapi_tags)
            app.openapi_schema = _key_optional(with_job_schemas(doc)) if keyless else with_job_schemas(doc)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def with_job_schemas(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the job schemas in its components and the submit routes' refs resolved to them."""
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    mode: JsonSchemaMode = "validation"
    _, defs = models_json_schema([(model, mode) for model in JOB_MODELS.values()],
                                 ref_template=_REF + "{model}" + _MARK)
    own: dict[str, Any] = defs["$defs"]
    renamed: set[str] = set()
    while True:  # a schema whose name FastAPI took for another one, and all that refer to it
        rendered = {name: _render(schema, renamed) for name, schema in own.items()}
        clash = {name for name, schema in rendered.items()
                 if name in components and components[name] != schema} - renamed
        if not clash:
            break
        renamed |= clash
    for name, schema in rendered.items():
        components[name + "-Input" if name in renamed else name] = schema
    _with_shortcuts(components, renamed)
    resolved: dict[str, Any] = _render(doc, renamed)
    return _challenged(_one_error_shape(resolved))


def _challenged(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the `WWW-Authenticate: Bearer` header every 401 carries (tasks/gateway/http.py)."""
    challenge = {"description": "`Bearer`: send a tenant's key", "schema": {"type": "string"}}
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            if "401" in operation.get("responses", {}):
                operation["responses"]["401"]["headers"] = {"WWW-Authenticate": challenge}
    return doc


def _key_optional(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with `{}` (no key) among each secured operation's alternatives."""
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            if operation.get("security"):
                operation["security"].append({})
    return doc


def _one_error_shape(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 of its own shape for routes with parameters; the gateway
    answers every 422 in the one error shape (tasks/gateway/http.py), so say that instead."""
    ours = {"description": "A header or parameter is malformed (the message says which)",
            "content": {"application/json": {"schema": {"$ref": _REF + "ErrorResponse"}}}}
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            theirs = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in json.dumps(theirs):
                operation["responses"]["422"] = ours
    for name in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(name, None)
    return doc


SHORTCUTS = ("ModelRef", "AdapterSpec", "ModelTarget")
"""Contracts that also take a plain string (a ref, an adapter ref, a model key): their `before`
validators accept it, which the schemas' generated JSON Schema does not say."""


def _with_shortcuts(components: dict[str, Any], renamed: set[str]) -> None:
    """Document the string forms that parse_job accepts besides the objects."""
    for name in SHORTCUTS:
        key = name + "-Input" if name in renamed else name
        if key in components:
            whole = dict(components[key])
            components[key] = {"title": whole.pop("title", name), "description": whole.get("description", ""),
                               "anyOf": [{"type": "string", "minLength": 1}, whole]}
    run = components.get("RunJob-Input" if "RunJob" in renamed else "RunJob", {})
    adapters = run.get("properties", {}).get("adapters", {})
    if "anyOf" in adapters:  # one adapter's name stands for a list of one
        adapters["anyOf"].insert(0, {"type": "string"})


def _render(value: Any, renamed: set[str]) -> Any:
    """`value` with the marked refs pointing at the names the schemas are published under."""
    text = json.dumps(value)
    for name in renamed:
        text = text.replace(f'"{_REF}{name}{_MARK}"', f'"{_REF}{name}-Input"')
    return json.loads(text.replace(_MARK, ""))
