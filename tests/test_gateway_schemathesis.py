"""schemathesis over the gateway's OpenAPI, every built-in check, on a real Redis: what the
document promises (bodies, statuses, the one error shape, headers) is what the server does.
Examples per operation are bounded (MODELQ_TEST_API_EXAMPLES) so the run stays within a minute."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as examples
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.schemas import BaseSchema

from tasks.gateway import create_gateway
from tasks.settings import Settings

load_all_checks()
EXAMPLES = int(os.environ.get("MODELQ_TEST_API_EXAMPLES", "30"))


@pytest.fixture
def gateway_api(settings: Settings) -> BaseSchema:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_gateway(settings))
    # A job body that JSON Schema allows may still break a rule JSON Schema cannot say (exactly
    # one of repo_id or path, a hex model key, unique adapter names, a pinned commit for remote
    # code): parse_job refuses it with 422, which is the documented answer for an invalid job.
    accepted = schema.config.checks.positive_data_acceptance
    accepted.expected_statuses = [*accepted.expected_statuses, "422"]
    return schema


api = schemathesis.pytest.from_fixture("gateway_api")


@api.parametrize()
@examples(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_the_gateway_does_what_its_openapi_says(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS.get_all())
