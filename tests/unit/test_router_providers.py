"""Providers against loopback servers that speak the real OpenAI, Azure and Bedrock wire protocols.

The real ``openai`` and ``boto3`` clients make real HTTP requests (SigV4-signed for Bedrock, event-stream
framed for ConverseStream); only the server end is ours.
"""

from __future__ import annotations

import pytest
from botocore.eventstream import EventStreamBuffer

from ray_app.router.config import Target
from ray_app.router.providers import (
    BedrockProvider,
    OpenAIProvider,
    ProviderError,
    RetryPolicy,
    from_converse,
    make_provider,
    to_converse,
)
from tests.router_servers import BedrockServer, OpenAIServer, encode_event

REPLY = "Paris is the capital of France"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


class Sleeps:
    """An injected sleep that records the delays instead of waiting."""

    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture(scope="module")
def openai_server():
    server = OpenAIServer(REPLY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bedrock_server():
    server = BedrockServer(REPLY).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh(request):
    for name in ("openai_server", "bedrock_server"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def _openai_target(server: OpenAIServer, kind: str = "openai") -> Target:
    extra = ({"base_url": server.url, "api_version": "2024-10-21"} if kind == "azure"
             else {"base_url": f"{server.url}/v1"})
    return Target(name=f"{kind}-t", kind=kind, model="gpt-test", api_key_env="TEST_KEY", context_window=8192,
                  price_in_per_mtok=1, price_out_per_mtok=2, timeout_s=10, **extra)


def _bedrock(server: BedrockServer, sleeps: Sleeps, max_retries: int = 2) -> BedrockProvider:
    target = Target(name="bedrock-t", kind="bedrock", model="anthropic.claude-3-haiku-20240307-v1:0",
                    region="us-east-1", endpoint_url=server.url, context_window=200000, price_in_per_mtok=1,
                    price_out_per_mtok=2, timeout_s=10)
    return BedrockProvider.from_target(target, RetryPolicy(max_retries=max_retries, sleep=sleeps),
                                       aws_access_key_id="AKIDTEST", aws_secret_access_key="secret-test")


async def _collect(stream) -> list[dict]:
    return [chunk async for chunk in stream]


def _streamed_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- OpenAI and Azure ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_openai_chat(openai_server, kind):
    provider = make_provider(_openai_target(openai_server, kind), environ={"TEST_KEY": "sk-test-123"},
                             retry=RetryPolicy(sleep=Sleeps()))
    response = await provider.chat({"model": "auto", "messages": MESSAGES, "temperature": 0.2, "max_tokens": 50,
                                    "custom_field": {"a": 1}})
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"] == REPLY
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    (seen,) = openai_server.requests
    # The route name is replaced by the target's model; unknown fields ride along in the body.
    assert seen.body["model"] == "gpt-test" and seen.body["temperature"] == 0.2
    assert seen.body["custom_field"] == {"a": 1} and seen.body["messages"] == MESSAGES
    if kind == "azure":
        assert seen.path == "/openai/deployments/gpt-test/chat/completions"
        assert seen.query == {"api-version": "2024-10-21"}
        assert seen.headers["api-key"] == "sk-test-123"
    else:
        assert seen.path == "/v1/chat/completions"
        assert seen.headers["authorization"] == "Bearer sk-test-123"


@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_openai_tools_are_forwarded_and_calls_come_back(openai_server, kind):
    provider = make_provider(_openai_target(openai_server, kind), environ={"TEST_KEY": "k"})
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = await provider.chat({"messages": MESSAGES, "tools": [TIME, WEATHER], "tool_choice": named,
                                    "parallel_tool_calls": False})
    (seen,) = openai_server.requests
    assert seen.body["tools"] == [TIME, WEATHER] and seen.body["tool_choice"] == named
    assert seen.body["parallel_tool_calls"] is False
    (call,) = response["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "loopback"}'}


@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_openai_stream_ends_with_usage(openai_server, kind):
    provider = make_provider(_openai_target(openai_server, kind), environ={"TEST_KEY": "k"})
    chunks = await _collect(provider.stream({"messages": MESSAGES, "max_tokens": 3}))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert _streamed_text(chunks) == "Paris is the"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert openai_server.requests[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("status", [500, 429])
async def test_openai_retries_then_succeeds(openai_server, status):
    sleeps = Sleeps()
    provider = OpenAIProvider.from_target(_openai_target(openai_server), "k", RetryPolicy(max_retries=2, sleep=sleeps))
    openai_server.fail_next(2, status)
    response = await provider.chat({"messages": MESSAGES})
    assert response["choices"][0]["message"]["content"] == REPLY
    assert len(openai_server.requests) == 3 and len(sleeps.delays) == 2
    if status == 429:
        assert sleeps.delays == [0.0, 0.0]  # the server's Retry-After: 0 wins over backoff


async def test_openai_stream_retries_before_the_first_chunk(openai_server):
    sleeps = Sleeps()
    provider = OpenAIProvider.from_target(_openai_target(openai_server), "k", RetryPolicy(max_retries=1, sleep=sleeps))
    openai_server.fail_next(1, 503)
    chunks = await _collect(provider.stream({"messages": MESSAGES}))
    assert _streamed_text(chunks) == REPLY and len(sleeps.delays) == 1


async def test_openai_gives_up_after_max_retries(openai_server):
    sleeps = Sleeps()
    provider = OpenAIProvider.from_target(_openai_target(openai_server), "k", RetryPolicy(max_retries=2, sleep=sleeps))
    openai_server.fail_next(3, 500)
    with pytest.raises(ProviderError) as caught:
        await provider.chat({"messages": MESSAGES})
    assert caught.value.status == 500 and caught.value.retryable
    assert len(openai_server.requests) == 3 and len(sleeps.delays) == 2


async def test_client_errors_are_not_retried(openai_server):
    sleeps = Sleeps()
    provider = OpenAIProvider.from_target(_openai_target(openai_server), "k", RetryPolicy(max_retries=2, sleep=sleeps))
    openai_server.fail_next(1, 400)
    with pytest.raises(ProviderError) as caught:
        await provider.chat({"messages": MESSAGES})
    assert caught.value.status == 400 and not caught.value.retryable
    assert len(openai_server.requests) == 1 and sleeps.delays == []


def test_backoff_grows_and_is_capped():
    retry = RetryPolicy(base_delay_s=1, max_delay_s=5)
    assert 0.5 <= retry.delay(0, None) <= 1
    assert 2 <= retry.delay(2, None) <= 4
    assert 2.5 <= retry.delay(10, None) <= 5
    assert retry.delay(0, 60) == 5


def test_missing_api_key_is_reported_by_name(openai_server):
    with pytest.raises(ValueError, match="TEST_KEY is not set"):
        make_provider(_openai_target(openai_server), environ={})


# --- Bedrock ------------------------------------------------------------------------------------

async def test_bedrock_converse(bedrock_server):
    provider = _bedrock(bedrock_server, Sleeps())
    request = {"messages": MESSAGES + [{"role": "assistant", "content": "Paris."},
                                       {"role": "user", "content": [{"type": "text", "text": "And Spain?"}]}],
               "max_tokens": 20, "temperature": 0.5, "top_p": 0.9, "stop": "END"}
    response = await provider.chat(request)
    assert response["object"] == "chat.completion" and response["model"] == provider.target.model
    assert response["id"] == "chatcmpl-loopback-request"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"] == {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}
    (seen,) = bedrock_server.requests
    assert seen.path == "/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
    assert seen.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
    assert "/us-east-1/bedrock/aws4_request" in seen.headers["authorization"]
    assert seen.body["system"] == [{"text": "Be brief."}]
    assert seen.body["messages"] == [
        {"role": "user", "content": [{"text": "Capital of France?"}]},
        {"role": "assistant", "content": [{"text": "Paris."}]},
        {"role": "user", "content": [{"text": "And Spain?"}]},
    ]
    assert seen.body["inferenceConfig"] == {"maxTokens": 20, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]}


async def test_bedrock_stream(bedrock_server):
    provider = _bedrock(bedrock_server, Sleeps())
    chunks = await _collect(provider.stream({"messages": MESSAGES, "max_tokens": 4}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _streamed_text(chunks) == "Paris is the capital"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert len({c["id"] for c in chunks}) == 1
    assert bedrock_server.requests[0].path.endswith("/converse-stream")


@pytest.mark.parametrize("status", [500, 429])
async def test_bedrock_retries_then_succeeds(bedrock_server, status):
    sleeps = Sleeps()
    provider = _bedrock(bedrock_server, sleeps)
    bedrock_server.fail_next(2, status)
    response = await provider.chat({"messages": MESSAGES})
    assert response["choices"][0]["message"]["content"] == REPLY
    assert len(bedrock_server.requests) == 3 and len(sleeps.delays) == 2


async def test_bedrock_stream_retries_a_throttling_event(bedrock_server):
    sleeps = Sleeps()
    provider = _bedrock(bedrock_server, sleeps)
    bedrock_server.throttle_next_stream(1)
    chunks = await _collect(provider.stream({"messages": MESSAGES}))
    assert _streamed_text(chunks) == REPLY
    assert len(bedrock_server.requests) == 2 and len(sleeps.delays) == 1


async def test_bedrock_throttling_exhausts_retries_as_429(bedrock_server):
    provider = _bedrock(bedrock_server, Sleeps(), max_retries=1)
    bedrock_server.fail_next(2, 429)
    with pytest.raises(ProviderError) as caught:
        await provider.chat({"messages": MESSAGES})
    assert caught.value.status == 429 and caught.value.retryable


async def test_bedrock_server_refuses_unsigned_requests(bedrock_server):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    client = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=bedrock_server.url,
                          config=Config(signature_version=UNSIGNED))
    provider = BedrockProvider(_bedrock(bedrock_server, Sleeps()).target, client, RetryPolicy(sleep=Sleeps()))
    with pytest.raises(ProviderError) as caught:
        await provider.chat({"messages": MESSAGES})
    assert caught.value.status == 403 and not caught.value.retryable


async def test_unsupported_bedrock_requests_fail_without_a_call(bedrock_server):
    provider = _bedrock(bedrock_server, Sleeps())
    with pytest.raises(ProviderError, match="response_format"):
        await provider.chat({"messages": MESSAGES, "response_format": {"type": "json_object"}})
    assert bedrock_server.requests == []


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


async def test_bedrock_tools_map_to_tool_config_and_tool_use_both_ways(bedrock_server):
    provider = _bedrock(bedrock_server, Sleeps())
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = await provider.chat({"messages": MESSAGES, "tools": [TIME, WEATHER], "tool_choice": named})
    (seen,) = bedrock_server.requests
    assert seen.body["toolConfig"] == {"tools": [
        {"toolSpec": {"name": "get_time", "inputSchema": {"json": TIME["function"]["parameters"]}}},
        {"toolSpec": {"name": "get_weather", "description": "Weather in a city.",
                      "inputSchema": {"json": WEATHER["function"]["parameters"]}}}],
        "toolChoice": {"tool": {"name": "get_weather"}}}
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "loopback"}'} and call["id"]

    # the round trip: the call and its result go back as toolUse and toolResult blocks
    follow_up = MESSAGES + [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "21 C"}]
    answer = await provider.chat({"messages": follow_up, "tools": [WEATHER], "tool_choice": "required"})
    assert answer["choices"][0]["message"]["content"] == REPLY
    sent = bedrock_server.requests[1].body
    assert sent["toolConfig"]["toolChoice"] == {"any": {}}
    assert sent["messages"][1] == {"role": "assistant", "content": [
        {"toolUse": {"toolUseId": call["id"], "name": "get_weather", "input": {"city": "loopback"}}}]}
    assert sent["messages"][2] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": call["id"], "content": [{"text": "21 C"}]}}]}


async def test_bedrock_streams_tool_calls_as_openai_deltas(bedrock_server):
    provider = _bedrock(bedrock_server, Sleeps())
    chunks = await _collect(provider.stream({"messages": MESSAGES, "tools": [WEATHER]}))
    assert bedrock_server.requests[0].body["toolConfig"]["toolChoice"] == {"auto": {}}
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"] and deltas[0]["index"] == 0
    assert "".join(d["function"].get("arguments", "") for d in deltas) == '{"city": "loopback"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_tool_choice_none_drops_the_tools_unless_earlier_turns_used_them():
    assert "toolConfig" not in to_converse({"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "none"}, "m")
    used = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with pytest.raises(ValueError, match="tool_choice none"):
        to_converse({"messages": used, "tools": [WEATHER], "tool_choice": "none"}, "m")
    with pytest.raises(ValueError, match="not JSON"):
        to_converse({"messages": MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "m")


@pytest.mark.parametrize("stop_reason, finish", [("end_turn", "stop"), ("stop_sequence", "stop"),
                                                 ("max_tokens", "length"), ("guardrail_intervened", "content_filter")])
def test_finish_reason_mapping(stop_reason, finish):
    response = {"output": {"message": {"content": [{"text": "a"}, {"text": "b"}]}}, "stopReason": stop_reason,
                "usage": {"inputTokens": 1, "outputTokens": 2}}
    converted = from_converse(response, "m")
    assert converted["choices"][0]["finish_reason"] == finish
    assert converted["choices"][0]["message"]["content"] == "ab"
    assert converted["usage"]["total_tokens"] == 3


def test_images_are_refused_for_bedrock():
    with pytest.raises(ValueError, match="only text"):
        to_converse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                    "m")


def test_consecutive_turns_of_one_role_are_merged():
    kwargs = to_converse({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "m")
    assert kwargs["messages"] == [{"role": "user", "content": [{"text": "a"}, {"text": "b"}]}]
    assert "system" not in kwargs and "inferenceConfig" not in kwargs


def test_event_encoder_round_trips_through_botocore():
    buffer = EventStreamBuffer()
    buffer.add_data(encode_event({":event-type": "messageStop", ":message-type": "event"}, b'{"stopReason":"end_turn"}'))
    (message,) = list(buffer)
    assert message.headers == {":event-type": "messageStop", ":message-type": "event"}
    assert message.payload == b'{"stopReason":"end_turn"}'
