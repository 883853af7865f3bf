"""Tool calling on SmolLM2 through the official ``openai`` client: named and ``required`` choices give
arguments valid against the tool's schema (vLLM's structured outputs), ``auto`` with the hermes
parser, streamed calls the SDK assembles, the round trip to a final answer, and a model without
``tools:`` in its config refused with our config's names."""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)


def valid_weather_arguments(arguments: str) -> dict:
    parsed = json.loads(arguments)
    assert set(parsed) == {"city", "unit"} and isinstance(parsed["city"], str) and parsed["unit"] in ("celsius",
                                                                                                     "fahrenheit")
    return parsed


def test_a_named_function_gets_schema_valid_arguments_streamed_or_not(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                           max_tokens=64, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    arguments = valid_weather_arguments(call.function.arguments)
    assert reply.usage.completion_tokens > 0

    # streamed: the SDK assembles the deltas into the same call
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                        max_tokens=64, temperature=0) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls
    assert streamed.function.name == "get_weather"
    assert valid_weather_arguments(streamed.function.arguments) == arguments


def test_required_calls_one_of_the_tools_and_the_round_trip_answers(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=64, temperature=0)
    calls = reply.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    valid_weather_arguments(calls[0].function.arguments)

    follow_up = ASK + [reply.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temperature_c": 21})}]
    answer = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER], max_tokens=48,
                                            temperature=0)
    message = answer.choices[0].message
    assert (message.content or "").strip() or message.tool_calls  # the model read the result and went on


def test_auto_leaves_the_choice_to_the_model_and_never_leaks_call_markup(client):
    # SmolLM2-135M seldom decides to call on its own (benchmarks/tool_bench.py measures how seldom), so
    # this holds either way: a call it writes comes back parsed, never as <tool_call> text
    for messages in (ASK, [{"role": "user", "content": "Call get_weather for Paris in celsius."}]):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64,
                                               temperature=0)
        choice = reply.choices[0]
        assert "<tool_call>" not in (choice.message.content or "")
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            assert choice.message.tool_calls[0].function.name == "get_weather"
            valid_weather_arguments(choice.message.tool_calls[0].function.arguments)
        else:
            assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_a_model_without_tools_in_its_config_is_refused_naming_the_config(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-llama", messages=ASK, tools=[WEATHER], max_tokens=8)
    body = exc.value.body
    assert body["param"] == "tools" and body["code"] == "tools_not_configured"
    assert "`tools:`" in body["message"] and "--" not in body["message"]
    # tool_choice none is a plain chat, which every model takes
    reply = client.chat.completions.create(model="tiny-llama", messages=ASK, tools=[WEATHER], tool_choice="none",
                                           max_tokens=4)
    assert reply.choices[0].message.tool_calls in (None, [])
    models = {m.id: m.model_extra.get("tool_calling") for m in client.models.list().data}
    assert models[MODEL] == "auto" and models["tiny-llama"] is None
