"""The real thing: a local Ray cluster, Ray Serve over HTTP, vLLM CPU engines, driven with the
official ``openai`` SDK (sync, async, streaming) and raw HTTP for the error paths."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.e2e

SMOL = "smollm2-135m-instruct"
TINY = "tiny-llama"
EMBED = "all-minilm-l6-v2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture  # per test: an async client's connections belong to one event loop
def aclient(served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)


def test_models_and_health(served, client):
    models = {m.id: m for m in client.models.list().data}
    routes = {name for name, m in models.items() if m.model_extra["kind"] == "route"}
    assert set(models) - routes == {SMOL, TINY, EMBED} and "auto" in routes
    assert client.models.retrieve(TINY).id == TINY
    assert client.models.retrieve("auto").model_extra["kind"] == "route"
    health = httpx.get(served.base_url + "/health").json()
    assert health["status"] == "ok"
    # the gateway runs in SmolLM2's replicas (the shipped `gateway.host_llm`): no deployment of its own
    assert set(health["deployments"]) == {f"LLM:{SMOL}", f"LLM:{TINY}", f"Embedder:{EMBED}", "OCR", "Knowledge",
                                          "Router"}
    assert set(health["deployments"].values()) == {"HEALTHY"}


def test_dashboard_lists_the_deployments(ray_cluster, served):
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    # Ray enables token auth for local clusters; its own SDK sends the token the same way
    response = httpx.get(ray_cluster.dashboard_url + "/api/serve/applications/", timeout=30,
                         headers=get_auth_headers_if_auth_enabled({}))
    assert response.status_code == 200, response.text
    deployments = response.json()["applications"]["ray_app"]["deployments"]
    assert {f"LLM:{SMOL}", f"LLM:{TINY}", f"Embedder:{EMBED}"} <= set(deployments)


def test_smollm2_answers_with_usage(client):
    response = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=24, temperature=0)
    assert "Paris" in response.choices[0].message.content
    usage = response.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # without sampling parameters the model's own defaults apply (temperature 0.2), not temperature 1
    default = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=24, seed=1)
    assert "Paris" in default.choices[0].message.content


def test_streaming_gives_the_same_text_as_non_streaming(client):
    whole = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions(client):
    response = client.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in response.choices[0].text
    assert response.usage.completion_tokens == 8 or response.choices[0].finish_reason == "stop"


async def test_concurrent_async_requests(aclient):
    async def one(i: int):
        return await aclient.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=16,
            temperature=0, extra_body={"ignore_eos": True})

    responses = await asyncio.gather(*(one(i) for i in range(8)))
    assert [r.usage.completion_tokens for r in responses] == [16] * 8


async def test_async_streaming(aclient):
    stream = await aclient.chat.completions.create(model=TINY, messages=FRANCE, max_tokens=12, stream=True,
                                                   extra_body={"ignore_eos": True},
                                                   stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"


def test_sampling_parameters(client):
    two = client.chat.completions.create(model=TINY, messages=FRANCE, n=2, max_tokens=8, temperature=1.0, seed=7)
    assert len(two.choices) == 2
    a = client.chat.completions.create(model=TINY, messages=FRANCE, max_tokens=16, temperature=1.0, seed=42)
    b = client.chat.completions.create(model=TINY, messages=FRANCE, max_tokens=16, temperature=1.0, seed=42)
    c = client.chat.completions.create(model=TINY, messages=FRANCE, max_tokens=16, temperature=1.0, seed=43)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content
    capped = client.chat.completions.create(model=TINY, messages=FRANCE, max_completion_tokens=5, temperature=1.0,
                                            extra_body={"ignore_eos": True})
    assert capped.usage.completion_tokens == 5 and capped.choices[0].finish_reason == "length"
    top_p = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=24, temperature=0.7, top_p=0.1)
    assert "Paris" in top_p.choices[0].message.content  # top_p=0.1 keeps only the dominant tokens


def test_stop_sequences(client):
    response = client.chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=24, temperature=0,
                                              stop=["Paris"])
    assert response.choices[0].finish_reason == "stop"
    assert "Paris" not in response.choices[0].message.content
    assert response.choices[0].message.content.startswith("The capital of France is")


def test_logprobs(client):
    response = client.chat.completions.create(model=TINY, messages=FRANCE, max_tokens=4, logprobs=True,
                                              top_logprobs=3, extra_body={"ignore_eos": True})
    tokens = response.choices[0].logprobs.content
    assert len(tokens) == 4
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens)


def test_structured_output_with_a_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    # even a random tiny model must produce schema-valid JSON: the grammar constrains decoding
    for model in (TINY, SMOL):
        response = client.chat.completions.create(
            model=model, messages=FRANCE, max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert response.choices[0].finish_reason == "stop", response.choices[0].message.content
        parsed = json.loads(response.choices[0].message.content)
        assert set(parsed) == {"city"} and isinstance(parsed["city"], str)


def test_embeddings_are_semantic_and_base64_matches_float(client, served):
    texts = ["The cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    response = httpx.post(served.v1 + "/embeddings", json={"model": EMBED, "input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    floats = response.json()
    vectors = np.array([d["embedding"] for d in floats["data"]])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.3
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 20
    sdk = client.embeddings.create(model=EMBED, input=texts)  # base64 on the wire
    assert np.allclose(np.array([d.embedding for d in sdk.data]), vectors, atol=1e-6)


def test_error_responses(served, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-9", messages=FRANCE)
    assert exc.value.body["code"] == "model_not_found" and TINY in exc.value.body["message"]

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hello " * 600}])
    assert exc.value.body["code"] == "context_length_exceeded" and "512" in exc.value.body["message"]

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TINY, messages=FRANCE, temperature=-1)
    assert exc.value.body["param"] == "temperature"

    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=EMBED, input="word " * 400)
    assert exc.value.body["code"] == "context_length_exceeded" and "256" in exc.value.body["message"]

    big = httpx.post(served.v1 + "/chat/completions", timeout=60,
                     json={"model": TINY, "messages": [{"role": "user", "content": "x" * 3_000_000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_malformed_requests_never_kill_a_replica(served, client):
    bad_bodies = [b"", b"{", b"[]", b'{"model": 5}', b'{"model": "tiny-llama", "messages": [{"role": 7}]}',
                  b'{"model": "tiny-llama", "messages": [], "n": -3}', "\udcff".encode("utf-8", "surrogatepass")]
    for body in bad_bodies:
        r = httpx.post(served.v1 + "/chat/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    response = client.chat.completions.create(model=TINY, messages=FRANCE, max_tokens=4)
    assert response.choices[0].message.content is not None
    health = httpx.get(served.base_url + "/health").json()
    assert set(health["deployments"].values()) == {"HEALTHY"}


async def test_client_disconnect_aborts_the_engine_request(served):
    from ray import serve

    engine = serve.get_deployment_handle(f"LLM:{TINY}", app_name="ray_app")
    assert await engine.num_unfinished_requests.remote() == 0
    body = {"model": TINY, "messages": FRANCE, "max_tokens": 480, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", served.v1 + "/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            for _ in range(6):
                await anext(lines)
            assert await engine.num_unfinished_requests.remote() == 1
    # the client hung up long before 480 tokens: the engine must drop the request
    deadline = time.monotonic() + 10
    while await engine.num_unfinished_requests.remote() != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that went away"
        await asyncio.sleep(0.2)
