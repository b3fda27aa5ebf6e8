"""Property-based fuzzing of every operation in /openapi.json (schemathesis): no 5xx, no crash, and every
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

from tests.support.processes import LiveNode

pytestmark = pytest.mark.slow

# Generation is real (the embedded model on CPU), so each request is cut to a few tokens and its texts to a few
# hundred characters; everything else about the generated bodies stays as hypothesis made it.
MAX_FUZZ_TOKENS = 3
MAX_FUZZ_TEXT = 200
# long generated prompts take a while to prefill on a busy CPU (schemathesis' default is 10 s)
REQUEST_TIMEOUT_S = 120
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _shorten(value: Any) -> Any:
    """Generated prompts can be long runs of rare characters, thousands of tokens to prefill on a CPU."""
    if isinstance(value, str):
        return value[:MAX_FUZZ_TEXT]
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v) if k in ("content", "text", "prompt") else v for k, v in value.items()}
    return value


def bound_generation(body: Any) -> None:
    if not isinstance(body, dict):
        return
    for key in ("messages", "prompt"):
        if key in body:
            body[key] = _shorten(body[key])
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body:
            body[key] = MAX_FUZZ_TOKENS
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", MAX_FUZZ_TOKENS)  # OpenAI bodies; Ollama's ignore it
        if isinstance(body.get("options"), dict):
            body["options"]["num_predict"] = MAX_FUZZ_TOKENS
        elif body.get("options") is None:
            body["options"] = {"num_predict": MAX_FUZZ_TOKENS}  # Ollama bodies; OpenAI's ignore it


def _describe(failure: BaseException) -> str:
    # a schemathesis failure group's own text has the response and a curl line to reproduce it
    return f"{type(failure).__name__}: {failure}"


def fuzz_operation(operation: Any, mode: GenerationMode, examples: int, node: LiveNode, model_id: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode), served_model=st.booleans())
    # no shrinking: against a live server it takes minutes, and the failure report already has a curl line
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate])
    def run(case: Case, served_model: bool) -> None:
        bound_generation(case.body)
        if served_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model_id  # else nearly every generated name is unknown: 404, no generation
        response = case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
        if case.method.upper() == "POST" and case.path == "/instance" and response.status_code == 201:
            # a generated request that happened to be valid: don't leave a runner loading behind
            instance_id = response.json()["instance"]["instance_id"]
            assert httpx.delete(f"{node.url}/instance/{instance_id}").status_code == 200
        assert node.process.poll() is None, "the node died"

    run()


@pytest.mark.parametrize("mode, examples", [(GenerationMode.POSITIVE, 12), (GenerationMode.NEGATIVE, 8)],
                         ids=["valid-requests", "invalid-requests"])
def test_no_server_error_for_any_generated_request(live_node: LiveNode, model_id: str, mode: GenerationMode,
                                                  examples: int) -> None:
    schema = schemathesis.openapi.from_url(live_node.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 17, "every endpoint is in the schema"
    failures = []
    for operation in operations:
        try:
            fuzz_operation(operation, mode, examples, live_node, model_id)
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, f"{operation.label}: no valid request can be generated"
            continue  # every request to it is valid (no parameters, or any string goes): nothing to negate
        except (Exception, BaseExceptionGroup) as failure:  # noqa: BLE001  gather every operation's failure
            failures.append(f"{operation.label}: {_describe(failure)}")
    assert not failures, "\n\n".join(failures)
    assert live_node.get("/health").status_code == 200
