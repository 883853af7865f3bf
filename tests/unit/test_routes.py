"""The OpenAI routes in-process (no Ray): wire format, streaming, usage and every error path."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import httpx
import numpy as np
import openai
import pytest

from ray_app.serve import openai_api
from ray_app.serve.config import GatewayConfig
from ray_app.serve.openai_api import OpenAIService
from ray_app.serve.protocol import ModelCard
from ray_app.serve.routes import HealthReport, build_api
from tests.fakes import FakeEmbedder, FakeLLM


class Harness:
    def __init__(self, llms=None, embedders=None, max_request_bytes=4096, timeout_s=5.0, ready=True):
        self.llms = llms if llms is not None else {"fake-llm": FakeLLM()}
        self.embedders = embedders if embedders is not None else {"fake-embed": FakeEmbedder()}
        cards = {n: ModelCard(id=n, kind="llm") for n in self.llms}
        cards |= {n: ModelCard(id=n, kind="embedding") for n in self.embedders}
        self.usage = []  # what the service logs and counts in metrics, request by request
        # the module's own function is restored by the fixture below
        openai_api.log_usage = lambda record, *, line: self.usage.append(record)
        self.service = OpenAIService(self.llms, self.embedders, cards, timeout_s=timeout_s)
        self.ready = ready

        async def health() -> HealthReport:
            return HealthReport(self.ready, {"Gateway": "HEALTHY" if self.ready else "UNHEALTHY"})

        self.app = build_api(self.service, GatewayConfig(max_request_bytes=max_request_bytes), health)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")
        self.client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=self.http,
                                         max_retries=0)


_LOG_USAGE = openai_api.log_usage  # the module's own, taken at import: other modules' Harnesses replace it too


@pytest.fixture(autouse=True)
def _restore_log_usage(monkeypatch):
    monkeypatch.setattr(openai_api, "log_usage", _LOG_USAGE)


@pytest.fixture
def h() -> Harness:
    return Harness()


CHAT = {"model": "fake-llm", "messages": [{"role": "user", "content": "capital of France?"}]}


def assert_openai_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


async def test_models_list_and_retrieve(h: Harness):
    models = await h.client.models.list()
    assert sorted(m.id for m in models.data) == ["fake-embed", "fake-llm"]
    card = await h.client.models.retrieve("fake-llm")
    assert card.id == "fake-llm"
    error = assert_openai_error(await h.http.get("/v1/models/nope"), 404, param="model", code="model_not_found")
    assert "fake-llm" in error["message"] and "fake-embed" in error["message"]


async def test_chat_non_streaming_returns_usage(h: Harness):
    response = await h.client.chat.completions.create(**CHAT)
    assert response.choices[0].message.content == "Paris is the capital."
    assert response.usage.prompt_tokens == 7 and response.usage.completion_tokens == 4
    assert h.usage[-1].completion_tokens == 4 and not h.usage[-1].stream


async def test_chat_streaming_forwards_chunks_and_hides_usage_unless_asked(h: Harness):
    stream = await h.client.chat.completions.create(**CHAT, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Paris is the capital."
    assert all(c.usage is None for c in chunks)
    # the engine was still asked for usage, so the request is accounted
    assert h.llms["fake-llm"].requests[-1].stream_options.include_usage is True
    assert h.usage[-1].stream and h.usage[-1].prompt_tokens == 7 and h.usage[-1].completion_tokens == 4
    assert h.usage[-1].ttft_seconds is not None


async def test_a_usage_line_per_request_is_logged_only_when_the_config_asks(monkeypatch):
    # Ray's log filters and handlers make the line a measurable share of the replica's event loop: off by
    # default, while the metrics count every request either way.
    counted, lines = [], []
    h = Harness()
    openai_api.log_usage = _LOG_USAGE  # the real one, not the harness's recorder
    monkeypatch.setattr("ray_app.metrics.record_request", lambda *args: counted.append(args))
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    gateway_log = logging.getLogger("ray_app.gateway")
    monkeypatch.setattr(gateway_log, "level", logging.INFO)
    gateway_log.addHandler(handler)
    try:
        await h.client.chat.completions.create(**CHAT)
        h.service.log_requests = True
        _ = [c async for c in await h.client.chat.completions.create(**CHAT, stream=True)]
    finally:
        gateway_log.removeHandler(handler)
    (line,) = [line for line in lines if line.startswith("usage ")]  # the second request's only
    assert "endpoint=chat" in line and "stream=True" in line and "completion_tokens=4" in line
    assert [(model, tokens) for model, _, _, tokens, *_ in counted] == [("fake-llm", 4), ("fake-llm", 4)]


async def test_chat_streaming_with_include_usage(h: Harness):
    stream = await h.client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 11


async def test_raw_stream_ends_with_done(h: Harness):
    response = await h.http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


async def test_text_completions(h: Harness):
    response = await h.client.completions.create(model="fake-llm", prompt="The capital of France is")
    assert response.choices[0].text == "Paris is the capital."
    assert response.usage.total_tokens == 11


async def test_unknown_model_is_404_listing_known_models(h: Harness):
    with pytest.raises(openai.NotFoundError) as exc:
        await h.client.chat.completions.create(**{**CHAT, "model": "gpt-9"})
    assert exc.value.body["code"] == "model_not_found"
    assert "fake-llm" in exc.value.body["message"]


async def test_chat_with_an_embedding_model_is_400(h: Harness):
    error = assert_openai_error(await h.http.post("/v1/chat/completions", json={**CHAT, "model": "fake-embed"}),
                                400, param="model")
    assert "/v1/embeddings" in error["message"]


async def test_model_may_be_omitted_only_when_unambiguous():
    one = Harness()
    response = await one.http.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert response.status_code == 200 and response.json()["model"] == "fake-llm"
    two = Harness(llms={"a": FakeLLM(), "b": FakeLLM()})
    assert_openai_error(await two.http.post("/v1/chat/completions", json={"messages": CHAT["messages"]}),
                        400, param="model")


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "messages": "not a list"}, "messages"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "stream_options": {"include_usage": True}}, None),  # stream_options without stream
    ({"model": "fake-llm"}, "messages"),
])
async def test_invalid_parameters_are_400(h: Harness, body, param):
    error = assert_openai_error(await h.http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


async def test_malformed_json_is_400(h: Harness):
    response = await h.http.post("/v1/chat/completions", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


async def test_prompt_over_context_is_400_and_says_the_limit(h: Harness):
    long = {**CHAT, "messages": [{"role": "user", "content": "word " * 100}]}
    error = assert_openai_error(await h.http.post("/v1/chat/completions", json=long), 400,
                                code="context_length_exceeded")
    assert "64" in error["message"]
    # the same on a stream: the error comes before any event, as an HTTP error
    error = assert_openai_error(await h.http.post("/v1/chat/completions", json={**long, "stream": True}), 400,
                                code="context_length_exceeded")


async def test_body_over_limit_is_413(h: Harness):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_openai_error(await h.http.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * 1000

    response = await h.http.post("/v1/chat/completions", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert_openai_error(response, 413)
    # a body under the limit still works afterwards
    assert (await h.http.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_embeddings_float_and_base64_agree(h: Harness):
    texts = ["first text", "second one here"]
    floats = await h.http.post("/v1/embeddings", json={"model": "fake-embed", "input": texts})
    b64 = await h.http.post("/v1/embeddings", json={"model": "fake-embed", "input": texts,
                                                    "encoding_format": "base64"})
    assert floats.status_code == b64.status_code == 200
    for f, b in zip(floats.json()["data"], b64.json()["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert np.allclose(decoded, f["embedding"])
    assert floats.json()["usage"] == {"prompt_tokens": 2 + 2 + 3 + 2, "completion_tokens": 0, "total_tokens": 9}
    # the SDK's default path (base64 on the wire, decoded client-side)
    response = await h.client.embeddings.create(model="fake-embed", input="first text")
    assert np.allclose(response.data[0].embedding, floats.json()["data"][0]["embedding"], atol=1e-6)


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "fake-embed", "input": "word " * 40}, 400, "input", "context_length_exceeded"),
    ({"model": "fake-embed", "input": [1, 2, 3]}, 400, "input", None),
    ({"model": "fake-embed", "input": []}, 400, "input", None),
    ({"model": "fake-embed", "input": "x", "dimensions": 4}, 400, "dimensions", None),
    ({"model": "fake-llm", "input": "x"}, 400, "model", None),
    ({"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
])
async def test_embedding_errors(h: Harness, body, status, param, code):
    assert_openai_error(await h.http.post("/v1/embeddings", json=body), status, param=param, code=code)


async def test_replica_failures_are_503():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    for exc, retry_after in ((ActorDiedError(), "5"),
                             (BackPressureError(num_queued_requests=5, max_queued_requests=5), "1")):
        llm = FakeLLM()
        h = Harness(llms={"fake-llm": llm})
        llm.chat = lambda request, exc=exc: _Raising(exc)
        response = await h.http.post("/v1/chat/completions", json=CHAT)
        error = assert_openai_error(response, 503, code="engine_unavailable")
        assert response.headers["retry-after"] == retry_after
        assert "fake-llm" in error["message"]


async def test_a_model_without_a_running_replica_fails_fast_with_503():
    h = Harness()
    llm = h.llms["fake-llm"]
    down = {"fake-llm": "no running replica (UNHEALTHY)", "fake-embed": "no running replica (UPDATING)"}

    async def unavailable(model: str) -> str | None:
        return down.get(model)

    h.service.unavailable = unavailable
    for route, body, model in (("/v1/chat/completions", CHAT, "fake-llm"),
                               ("/v1/embeddings", {"model": "fake-embed", "input": "x"}, "fake-embed")):
        response = await h.http.post(route, json=body)
        error = assert_openai_error(response, 503, code="engine_unavailable")
        assert response.headers["retry-after"] == "5" and down[model] in error["message"]
    assert not llm.requests  # refused before reaching the replica

    down.clear()
    assert (await h.http.post("/v1/chat/completions", json=CHAT)).status_code == 200


def test_unavailable_reason_reads_running_replicas_from_serve_status():
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
    from ray.serve.schema import ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

    from ray_app.serve.serve_status import unavailable_reason

    def status(running: int, state: str) -> ServeStatus:
        d = DeploymentStatusOverview(status=DeploymentStatus(state),
                                     status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, message="",
                                     replica_states={ReplicaState.RUNNING: running} if running else {})
        app = ApplicationStatusOverview(status="RUNNING", message="", last_deployed_time_s=0,
                                        deployments={"Embedder:e": d})
        return ServeStatus(applications={"app": app})

    assert unavailable_reason(status(0, "UPDATING"), "app", "Embedder:e") == "no running replica (UPDATING)"
    assert unavailable_reason(status(1, "HEALTHY"), "app", "Embedder:e") is None
    assert unavailable_reason(status(0, "HEALTHY"), "app", "Embedder:e", scales_to_zero=True) is None
    assert unavailable_reason(None, "app", "Embedder:e") is None  # no status, no verdict
    assert unavailable_reason(status(0, "UPDATING"), "other-app", "Embedder:e") is None


class _Raising:
    """A backend stream whose replica call fails, as a DeploymentResponseGenerator does."""

    def __init__(self, exc: BaseException):
        self.exc = exc
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise self.exc

    def cancel(self):
        self.cancelled = True


async def test_failure_mid_stream_is_an_error_event_then_done():
    llm = FakeLLM(reply="one two three four five six", fail_after=2)
    h = Harness(llms={"fake-llm": llm})
    response = await h.http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    words = [json.loads(e[len("data: "):])["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "".join(w or "" for w in words) == "one two three"  # the two batches sent before the failure
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == "engine_unavailable"


async def test_slow_engine_times_out_with_504():
    h = Harness(llms={"fake-llm": FakeLLM(delay_s=0.5)}, timeout_s=0.2)
    response = await h.http.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(response, 504, code="timeout")
    assert h.llms["fake-llm"].streams[-1].cancelled


async def test_an_engine_that_stalls_mid_stream_is_cut_off_at_the_deadline():
    h = Harness(llms={"fake-llm": FakeLLM(delay_s=0.15)}, timeout_s=0.25)  # two chunks every 0.15 s
    response = await h.http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [e for e in response.text.split("\n\n") if e]
    said = [json.loads(e[len("data: "):])["choices"][0]["delta"].get("content") for e in events[:2]]
    assert said == ["", "Paris"]  # the first two chunks came within the deadline, the next two did not
    error = json.loads(events[2][len("data: "):])["error"]
    assert error["code"] == "timeout" and "did not finish within 0.25 s" in error["message"]
    assert events[3:] == ["data: [DONE]"]
    assert h.llms["fake-llm"].streams[-1].cancelled  # the engine's request is aborted


async def test_a_stream_read_past_its_deadline_fails_at_its_next_chunk_and_not_before(h: Harness):
    from ray_app.serve.protocol import ChatCompletionRequest

    h.service.timeout_s = 0.1
    stream = (await h.service.chat(ChatCompletionRequest(**CHAT, stream=True))).result
    assert "Paris" in await anext(stream)
    await asyncio.sleep(0.2)  # the client reads slowly: the deadline passes between chunks
    rest = [event async for event in stream]
    assert "did not finish within 0.1 s" in rest[0] and rest[-1] == "data: [DONE]\n\n"
    assert h.llms["fake-llm"].streams[-1].cancelled
    # a stream that keeps its deadline is not cut, and its timer does not fire later
    h.service.timeout_s = 5.0
    stream = (await h.service.chat(ChatCompletionRequest(**CHAT, stream=True))).result
    events = [json.loads(e[len("data: "):]) for e in "".join([e async for e in stream]).split("\n\n")[:-2]]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "Paris is the capital."
    assert not h.llms["fake-llm"].streams[-1].cancelled


async def test_client_going_away_cancels_the_engine_request(h: Harness):
    from ray_app.serve.protocol import ChatCompletionRequest

    llm = h.llms["fake-llm"]
    llm.reply = " ".join(["word"] * 50)
    stream = (await h.service.chat(ChatCompletionRequest(**CHAT, stream=True))).result
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # what Starlette does when the client disconnects
    assert llm.streams[-1].cancelled
    # a stream read to the end is not cancelled
    stream = (await h.service.chat(ChatCompletionRequest(**CHAT, stream=True))).result
    _ = [p async for p in stream]
    assert not llm.streams[-1].cancelled


async def test_health_reports_readiness():
    ready, not_ready = Harness(ready=True), Harness(ready=False)
    assert (await ready.http.get("/health")).status_code == 200
    response = await not_ready.http.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "unavailable"


async def test_a_request_waiting_on_a_replica_that_died_gets_a_clear_503():
    # the replica took the request and died: Serve would hold it until a new replica has started
    llm = FakeLLM()
    h = Harness(llms={"fake-llm": llm})
    llm.chat = lambda request: _Hanging()
    down: dict[str, str] = {}

    async def unavailable(model: str) -> str | None:
        return down.get(model)

    h.service.unavailable = unavailable
    h.service.dispatcher._unavailable = unavailable
    h.service.dispatcher._watch_s = 0.02
    task = asyncio.ensure_future(h.http.post("/v1/chat/completions", json=CHAT))
    await asyncio.sleep(0.1)
    assert not task.done()  # still waiting on its replica
    down["fake-llm"] = "no running replica (UNHEALTHY)"
    response = await asyncio.wait_for(task, 2)
    error = assert_openai_error(response, 503, code="engine_unavailable")
    assert "became unavailable" in error["message"] and response.headers["retry-after"] == "5"


class _Hanging:
    cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


async def test_the_console_is_served_with_a_strict_content_security_policy(h: Harness):
    redirect = await h.http.get("/ui")
    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/ui/")
    page = await h.http.get("/ui/")
    assert page.status_code == 200 and '<script type="module" src="app.mjs">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = await h.http.get("/ui/app.mjs")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert (await h.http.get("/ui/vendor/preact.mjs")).status_code == 200
    assert (await h.http.get("/ui/%2e%2e/__init__.py")).status_code == 404
    off = build_api(h.service, GatewayConfig(console=False), lambda: None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off), base_url="http://test") as http:
        assert (await http.get("/ui/")).status_code == 404


async def test_tools_on_a_model_without_tool_calling_are_refused_naming_our_config(h: Harness):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = CHAT | {"tools": [tool]}
    error = assert_openai_error(await h.http.post("/v1/chat/completions", json=body), 400, param="tools",
                                code="tools_not_configured")
    assert "`tools:` under `llms`" in error["message"] and "--" not in error["message"]
    assert (await h.http.post("/v1/chat/completions", json=body | {"tool_choice": "none"})).status_code == 200
    h.service.cards["fake-llm"].tool_calling = "required"  # auto_tool_choice off in the model's config
    assert_openai_error(await h.http.post("/v1/chat/completions", json=body), 400, param="tool_choice")
    named = {"type": "function", "function": {"name": "f"}}
    assert (await h.http.post("/v1/chat/completions", json=body | {"tool_choice": named})).status_code == 200
    h.service.cards["fake-llm"].tool_calling = "auto"
    assert (await h.http.post("/v1/chat/completions", json=body)).status_code == 200


def test_the_token_routes_run_on_the_event_loop_without_a_thread_hop(h):
    """FastAPI hands a plain ``def`` dependency or endpoint to a worker thread and back: a thread hop on
    every request of the hot path (a tenth of the hosting replica's loop in a burst of one-token
    requests, py-spy)."""
    import inspect

    from fastapi.routing import APIRoute

    def calls(dependant):
        yield dependant.call
        for sub in dependant.dependencies:
            yield from calls(sub)

    hot = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
    routes = [r for r in h.app.routes if isinstance(r, APIRoute) and r.path in hot]
    assert {r.path for r in routes} == set(hot)
    blocking = [(r.path, c.__name__) for r in routes for c in calls(r.dependant)
                if not inspect.iscoroutinefunction(c)]
    assert not blocking, blocking
