"""A bounded schemathesis run against the app's own OpenAPI document: neither valid (positive)
nor invalid (negative) generated input yields a server error, and answers to valid input match
the documented status codes and response schemas.

Schemathesis' pytest fixture loader does not work with this pytest version, so the
operations' hypothesis strategies (``APIOperation.as_strategy``) are driven directly.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance  # not in schemathesis.checks up to 4.28

from recsys_flowadam.serve import create_app
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.synthetic import random_artifact

TOKEN = "fuzz-token"
NO_INPUT = [("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/model")]
WITH_INPUT = [
    ("POST", "/v1/predict"),
    ("GET", "/v1/users/{user}/recommendations"),
    ("GET", "/v1/items/{item}/similar"),
    ("POST", "/v1/admin/reload"),
]
OPERATIONS = NO_INPUT + WITH_INPUT
CASES = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [(*op, GenerationMode.NEGATIVE) for op in WITH_INPUT]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    artifact = random_artifact(tmp_path_factory.mktemp("fuzz") / "model", n_users=20, n_items=30, rank=4, model_type="cp")
    app = create_app(Settings(artifact_dir=artifact, admin_token=TOKEN, max_pairs=50))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schema_lists_every_operation(api_schema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_server_errors(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]
    # admin calls carry the token so that reload's own code paths are fuzzed, not just the 401
    headers = {"Authorization": f"Bearer {TOKEN}"} if path.startswith("/v1/admin") else None
    # a schema-valid reload of a folder that holds no artifact is refused with the documented 422
    # (the request is well-formed, the artifact is not), which this one check would call a rejection
    excluded = [positive_data_acceptance] if path.startswith("/v1/admin") else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        if mode is GenerationMode.POSITIVE:
            # all default checks: no 5xx, documented status codes, response schemas, ...
            case.call_and_validate(headers=headers, excluded_checks=excluded)
        else:
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

    run()
