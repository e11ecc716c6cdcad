"""The gateway's OpenAPI names its authentication as the gateway reads it: a tenant's key as a
bearer token or an X-API-Key header, on every operation but /healthz, refused with a documented
401 in the one error shape; a key is optional where the gateway has no tenants file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openapi_spec_validator  # type: ignore[import-untyped]
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from tasks.gateway.api import create_gateway
from tasks.settings import Settings
from tasks.tenants import load_tenants
from tests.support.tenancy import write_tenants

KEY = "GWAUTHMARKER-alice-0123456789abcdef"
SCHEMES = [{"TenantBearer": []}, {"TenantApiKey": []}]
OPEN = ("/healthz",)


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()]


def _check_documented(doc: dict[str, Any], optional: bool) -> None:
    openapi_spec_validator.validate(doc)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["TenantBearer"] == {**schemes["TenantBearer"], "type": "http", "scheme": "bearer"}
    assert schemes["TenantApiKey"] == {**schemes["TenantApiKey"], "type": "apiKey", "in": "header",
                                       "name": "X-API-Key"}
    for path, method, op in _operations(doc):
        where = f"{method} {path}"
        params = {p["name"].lower() for p in op.get("parameters", [])}
        assert not params & {"authorization", "x-api-key"}, where  # said by the schemes instead
        if path in OPEN:
            assert "security" not in op and "401" not in op["responses"], where
            continue
        assert op["security"] == SCHEMES + ([{}] if optional else []), where
        for status in ("401", "403"):
            content = op["responses"][status]["content"]["application/json"]["schema"]
            assert content == {"$ref": "#/components/schemas/ErrorResponse"}, where
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"], where


def test_the_single_tenant_spec_names_the_key_as_optional(settings: Settings) -> None:
    app = create_gateway(settings)
    _check_documented(app.openapi(), optional=True)
    with TestClient(app) as http:  # no key, or any: every caller is tenant 'default'
        for headers in ({}, {"X-API-Key": "anything"}):
            assert http.get("/v1/workers", headers=headers).status_code == 200


def test_a_tenant_gateway_asks_for_a_key_as_its_spec_says(settings: Settings, tmp_path: Path) -> None:
    tenants = write_tenants(tmp_path / "tenants.toml", {"alice": {"key": KEY, "roots": [str(tmp_path)]}})
    app = create_gateway(settings, tenants=load_tenants(tenants))
    doc = app.openapi()
    _check_documented(doc, optional=False)
    error_shape = Draft202012Validator({"$ref": "#/components/schemas/ErrorResponse",
                                        "components": doc["components"]})
    with TestClient(app) as http:
        for path in ("/v1/workers", "/v1/tasks", "/v1/jobs/" + "f" * 32):
            documented = doc["paths"][path.replace("f" * 32, "{job_id}")]["get"]["responses"]
            for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"X-API-Key": "nope"},
                            {"Authorization": "Basic " + KEY}):
                refused = http.get(path, headers=headers)
                assert refused.status_code == 401 and "401" in documented, (path, headers)
                assert refused.headers["www-authenticate"] == "Bearer"
                error_shape.validate(refused.json())
            for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
                answered = http.get(path, headers=headers)
                assert str(answered.status_code) in documented, (path, headers, answered.text)
                assert answered.status_code != 401
        assert http.get("/healthz").status_code == 200  # no key needed, none documented
