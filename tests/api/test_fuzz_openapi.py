"""Property-based fuzzing of every operation in /openapi.json (schemathesis) against a fake node: no 5xx, and every
answer matches its documented status, content type and schema.

schemathesis' pytest integration (`@schema.parametrize`) fails on pytest 9 (it sets `Function._nodeid`), so
each operation's hypothesis strategy is run directly."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ringlet.models.embedded import EMBEDDED_MODEL_ID
from tests.support.fake_node import FakeNode

REQUEST_TIMEOUT_S = 10
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _describe(failure: BaseException) -> str:
    # a schemathesis failure group's own text has the response and a curl line to reproduce it
    return f"{type(failure).__name__}: {failure}"


def fuzz_operation(operation: Any, mode: GenerationMode, examples: int, url: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode), served_model=st.booleans())
    # no shrinking: the failure report already has a curl line to reproduce it
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate])
    def run(case: Case, served_model: bool) -> None:
        if served_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = EMBEDDED_MODEL_ID  # else nearly every generated name is unknown: 404, no generation
        response = case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
        if case.method.upper() == "POST" and case.path == "/instance" and response.status_code == 201:
            # a generated request that happened to be valid: the next examples route to the embedded model's
            instance_id = response.json()["instance"]["instance_id"]
            assert httpx.delete(f"{url}/instance/{instance_id}").status_code == 200

    run()


@pytest.mark.parametrize("mode, examples", [(GenerationMode.POSITIVE, 20), (GenerationMode.NEGATIVE, 10)],
                         ids=["valid-requests", "invalid-requests"])
def test_no_server_error_for_any_generated_request(url: str, node: FakeNode, mode: GenerationMode,
                                                  examples: int) -> None:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 17, "every endpoint is in the schema"
    failures = []
    for operation in operations:
        try:
            fuzz_operation(operation, mode, examples, url)
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, f"{operation.label}: no valid request can be generated"
            continue  # every request to it is valid (no parameters, or any string goes): nothing to negate
        except (Exception, BaseExceptionGroup) as failure:  # noqa: BLE001  gather every operation's failure
            failures.append(f"{operation.label}: {_describe(failure)}")
    assert not failures, "\n\n".join(failures)
    if mode == GenerationMode.POSITIVE:
        assert any(task.model == EMBEDDED_MODEL_ID for task in node.submitted), "some requests generated text"
    assert not node.tasks, "every generation ended"
    assert httpx.get(url + "/health").status_code == 200
