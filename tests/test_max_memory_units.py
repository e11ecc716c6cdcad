"""`placement.max_memory` takes accelerate's unit strings ('30GiB', '500 MB') as well as byte
counts, and refuses other strings, the same way in all four doors: the JSON Schema
(`modelq schema`), the gateway (`POST /v1/jobs/load`, and the OpenAPI it publishes), the CLI
(`modelq load --max-memory`) and `Client.submit`. Each accepted job carries the bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from schemas import LoadJob, ModelRef
from schemas.specs import SIZE_JSON_SCHEMA, PlacementSpec
from tasks.cli.main import main
from tasks.cli.schema_doc import json_schema
from tasks.client import Client
from tasks.gateway.api import create_gateway
from tasks.settings import Settings

GIB = 2**30
TAKEN = [({"cpu": "30GiB"}, {"cpu": 30 * GIB}), ({"cuda:0": "1.5kib"}, {"cuda:0": 1536}),
         ({"0": "500 MB", "cpu": 1024}, {"0": 500 * 10**6, "cpu": 1024})]
REFUSED = [{"cpu": "30 parsecs"}, {"cpu": "GiB"}, {"cpu": -1}, {"cpu": "30GiB\n"}]


def _load(max_memory: Any) -> dict[str, Any]:
    return {"kind": "load", "model": {"repo_id": "org/model"}, "placement": {"max_memory": max_memory}}


@pytest.mark.parametrize(("given", "_"), TAKEN)
def test_the_json_schema_takes_unit_strings(given: dict[str, Any], _: Any) -> None:
    validator = Draft202012Validator(json_schema())
    assert validator.is_valid(_load(given))
    assert not any(validator.is_valid(_load(bad)) for bad in REFUSED)


@pytest.fixture
def http(settings: Settings) -> TestClient:
    return TestClient(create_gateway(settings), raise_server_exceptions=False)


def test_the_gateway_takes_unit_strings_and_documents_them(http: TestClient) -> None:
    for given, stored in TAKEN:
        accepted = http.post("/v1/jobs/load", json={"model": "org/model", "placement": {"max_memory": given}})
        assert accepted.status_code == 202, accepted.text
        record = http.get(f"/v1/jobs/{accepted.json()['job_id']}").json()
        assert record["job"]["placement"]["max_memory"] == stored
        assert http.post("/v1/jobs", json=_load(given)).status_code == 202
    for bad in REFUSED:
        refused = http.post("/v1/jobs/load", json={"model": "org/model", "placement": {"max_memory": bad}})
        assert refused.status_code == 422 and refused.json()["error"]["type"] == "InvalidJob", refused.text
    published = http.get("/openapi.json").json()["components"]["schemas"]
    spec = published.get("PlacementSpec-Input", published["PlacementSpec"])
    sizes = spec["properties"]["max_memory"]["anyOf"][0]["additionalProperties"]
    assert sizes == SIZE_JSON_SCHEMA and "'30GiB'" in sizes["description"]  # the contract says so too


def test_the_cli_takes_unit_strings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELQ_REDIS_URL", settings.redis_url)
    result = CliRunner().invoke(main, ["load", "org/model", "--max-memory", "cpu=30GiB",
                                       "--max-memory", "0=500 MB", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["job"]["placement"]["max_memory"] == {"cpu": 30 * GIB, "0": 500 * 10**6}
    refused = CliRunner().invoke(main, ["load", "org/model", "--max-memory", "cpu=30 parsecs"])
    assert refused.exit_code == 2 and "size" in refused.output


def test_the_client_takes_unit_strings(client: Client) -> None:
    for given, stored in TAKEN:
        job = LoadJob(model=ModelRef(repo_id="org/model"), placement=PlacementSpec(max_memory=given))
        assert client.submit(job).status().job.placement.max_memory == stored  # type: ignore[union-attr]
    for bad in REFUSED:
        with pytest.raises(ValidationError, match="max_memory"):
            PlacementSpec(max_memory=bad)
