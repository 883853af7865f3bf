"""The public schema and the validation agree: schemathesis in-process over the OpenAI routes (fake
engines), from the app's own ``/openapi.json``. What the schema allows is accepted, what it forbids
is refused with 400 in OpenAI's format, and no vLLM-internal field is part of the API."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS

from ray_app.serve.protocol import ModelCard
from tests.unit.test_routes import Harness, assert_openai_error

INTERNAL = ("kv_transfer_params", "ec_transfer_params", "vllm_xargs", "mm_payload", "routed_experts_prompt_start",
            "cache_salt", "priority", "request_id", "chat_template", "structured_outputs")


def harness() -> Harness:
    h = Harness(max_request_bytes=1 << 20)
    h.service.cards["fake-llm"] = ModelCard(id="fake-llm", kind="llm", tool_calling="auto", max_model_len=4096)
    h.llms["fake-llm"].max_model_len = 1 << 20  # the fake's context: generated prompts always fit
    return h


H = harness()
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", H.app)
# the refusals a JSON schema cannot say: they depend on the model served or on two values together
SEMANTIC = ("does not match any of the specified `tools`", "context length", "omit `dimensions` or set it to")


def test_no_internal_field_of_vllm_is_in_the_schema():
    text = json.dumps(H.app.openapi())
    assert [name for name in INTERNAL if f'"{name}"' in text] == []
    chat = H.app.openapi()["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "tools", "tool_choice", "rag", "top_k"} <= set(chat["properties"])
    assert chat["properties"]["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}


@pytest.mark.parametrize("field", ["kv_transfer_params", "vllm_xargs", "priority"])
async def test_an_internal_field_is_refused_naming_it(field):
    body = {"model": "fake-llm", "messages": [{"role": "user", "content": "hi"}], field: {}}
    error = assert_openai_error(await H.http.post("/v1/chat/completions", json=body), 400)
    assert f"unrecognized request argument: {field}" in error["message"]


@SCHEMA.include(path_regex="^/v1/(chat/completions|completions|embeddings)$").parametrize()
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_api_accepts_what_its_schema_allows_and_refuses_what_it_forbids(case):
    if case.meta.generation.mode.is_positive and isinstance(case.body, dict) and "model" in case.body:
        # a model named at random is a 404 (allowed, but it tests nothing): ask the served ones
        case.body["model"] = "fake-embed" if case.path.endswith("embeddings") else "fake-llm"
    response = case.call()

    if case.meta.generation.mode.is_positive and response.status_code == 400:
        message = response.json()["error"]["message"]
        if any(reason in message for reason in SEMANTIC):
            return
    case.validate_response(response, checks=[CHECKS.get_one(name) for name in (
        "not_a_server_error", "status_code_conformance", "content_type_conformance", "positive_data_acceptance",
        "negative_data_rejection")])
