"""The HTTP side of the router in-process: route names, route/cost headers, API keys (401/402/429),
spend of direct requests, and /v1/usage. The router backend is scripted here; the real Router
deployment runs in tests/e2e/test_router.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from ray_app.router.config import RouterConfig
from ray_app.router.ledger import LedgerEntry
from ray_app.router.service import RouteInfo
from ray_app.serve.auth import Auth, current_caller
from ray_app.serve.config import GatewayConfig
from ray_app.serve.errors import EngineUnavailableError
from ray_app.serve.openai_api import OpenAIService, log_usage
from ray_app.serve.protocol import ModelCard
from ray_app.serve.routes import HealthReport, build_api
from tests.fakes import FakeEmbedder, FakeLLM

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def router_config(tmp_path) -> RouterConfig:
    return RouterConfig.parse({
        "data_dir": str(tmp_path),
        "targets": [{"name": "local", "kind": "local", "model": "fake-llm", "context_window": 4096,
                     "hourly_rate_usd": 3.6}],
        "routes": {"auto": {"targets": ["local"]}},
        "keys": {"default_budget_usd": 1.0, "default_rpm": 1000, "default_tpm": 1_000_000},
        "local_hourly_rate_usd": 36.0,
    })


class ScriptedRouter:
    """Answers like RouterServer: (body, RouteInfo), or a stream of RouteInfo, SSE text, RouteInfo."""

    def __init__(self):
        self.calls: list[tuple[dict, dict]] = []
        self.error: Exception | None = None

    def _info(self, cost=None):
        return RouteInfo("auto", "local", "fake-llm", ["route 'auto': candidates ['local']"], cost_usd=cost,
                         usage=USAGE if cost is not None else None)

    async def chat(self, request, caller):
        self.calls.append((request, caller))
        if self.error:
            raise self.error
        body = {"id": "c", "object": "chat.completion", "created": 0, "model": "fake-llm", "usage": USAGE,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "routed!"},
                             "finish_reason": "stop"}]}
        return body, self._info(0.000123)

    async def chat_stream(self, request, caller):
        self.calls.append((request, caller))
        yield self._info()
        for word in ("rou", "ted"):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake-llm",
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield self._info(0.0001)


class Harness:
    def __init__(self, tmp_path):
        self.config = router_config(tmp_path)
        self.auth = Auth(self.config)
        self.router = ScriptedRouter()
        llms, embedders = {"fake-llm": FakeLLM()}, {"fake-embed": FakeEmbedder()}
        cards = {"fake-llm": ModelCard(id="fake-llm", kind="llm"), "fake-embed": ModelCard(id="fake-embed",
                                                                                          kind="embedding")}

        def on_usage(record):
            log_usage(record)
            self.auth.on_usage(record)

        self.service = OpenAIService(llms, embedders, cards, router=self.router, routes=frozenset({"auto"}),
                                     caller=current_caller, on_usage=on_usage, on_routed=self.auth.on_routed)

        async def health() -> HealthReport:
            return HealthReport(True)

        app = build_api(self.service, GatewayConfig(), health, auth=self.auth)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    def client(self, key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://test/v1", api_key=key, http_client=self.http, max_retries=0)


@pytest.fixture
def h(tmp_path) -> Harness:
    return Harness(tmp_path)


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


async def test_a_route_name_goes_to_the_router_with_route_and_cost_headers(h: Harness):
    response = await h.http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "routed!"
    assert response.headers["x-ray-app-route"] == "auto/local"
    assert "candidates" in response.headers["x-ray-app-reason"]
    assert float(response.headers["x-ray-app-cost-usd"]) == pytest.approx(0.000123)
    [(request, caller)] = h.router.calls
    assert request["messages"] == CHAT["messages"] and caller["key_id"] is None
    # a served model's own name still goes straight to it
    direct = await h.http.post("/v1/chat/completions", json=CHAT | {"model": "fake-llm"})
    assert direct.status_code == 200 and "x-ray-app-route" not in direct.headers
    assert len(h.router.calls) == 1
    models = {m.id: m.kind for m in (await h.client().models.list()).data}
    assert models["auto"] == "route" and models["fake-llm"] == "llm"
    assert (await h.client().models.retrieve("auto")).model_extra["kind"] == "route"


async def test_a_routed_stream_carries_the_route_headers_and_ends_with_done(h: Harness):
    async with h.http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response:
        assert response.headers["x-ray-app-route"] == "auto/local"
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    words = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert "".join(words) == "routed"


async def test_router_errors_keep_openai_format_and_status(h: Harness):
    h.router.error = EngineUnavailableError("no usable local target", code="no_local_target",
                                            headers={"retry-after": "5"})
    response = await h.http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "no_local_target"


async def test_the_api_is_open_until_a_key_exists_then_needs_one(h: Harness):
    assert (await h.http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    new = h.auth.keys.create("team-a")
    with pytest.raises(openai.AuthenticationError) as exc:
        await h.client().chat.completions.create(**CHAT)
    assert exc.value.status_code == 401 and "ray-app keys create" in exc.value.body["message"]
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        await h.client(new.secret[:-2] + "xx").chat.completions.create(**CHAT)
    ok = await h.client(new.secret).chat.completions.with_raw_response.create(**CHAT)
    assert ok.headers["x-ray-app-route"] == "auto/local"
    assert h.router.calls[-1][1]["key_id"] == new.record.key_id
    assert (await h.http.get("/health")).status_code == 200  # health stays open for probes
    h.auth.keys.revoke(new.record.key_id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        await h.client(new.secret).chat.completions.create(**CHAT)


async def test_a_confidential_key_is_passed_to_the_router(h: Harness):
    new = h.auth.keys.create("legal", confidential=True)
    await h.client(new.secret).chat.completions.create(**CHAT, extra_headers={"X-Confidential": "1"})
    caller = h.router.calls[-1][1]
    assert caller["confidential"] is True and caller["headers"]["x-confidential"] == "1"
    assert "authorization" not in caller["headers"]  # the key never travels further


async def test_a_spent_budget_is_402_and_a_rate_limit_is_429_with_retry_after(h: Harness):
    spender = h.auth.keys.create("spender", budget_usd=0.01)
    h.auth.ledger.record(LedgerEntry(spender.record.key_id, "auto", "local", "fake-llm", 1, 1, 0.02, 0.1, "ok"))
    with pytest.raises(openai.APIStatusError) as exc:
        await h.client(spender.secret).chat.completions.create(**CHAT)
    assert exc.value.status_code == 402 and exc.value.body["code"] == "budget_exceeded"
    assert "$0.0200 of its $0.01 monthly budget" in exc.value.body["message"]

    limited = h.auth.keys.create("limited", rpm=2)
    for _ in range(2):
        await h.client(limited.secret).chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError) as exc:
        await h.client(limited.secret).chat.completions.create(**CHAT)
    assert exc.value.body["code"] == "rate_limit_exceeded_rpm"
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60


async def test_direct_requests_are_charged_and_usage_is_per_key(h: Harness):
    a, b = h.auth.keys.create("a"), h.auth.keys.create("b")
    await h.client(a.secret).chat.completions.create(**CHAT | {"model": "fake-llm"})
    await h.client(a.secret).embeddings.create(model="fake-embed", input=["one two"])
    await h.client(b.secret).chat.completions.create(**CHAT | {"model": "fake-llm"})
    for _ in range(50):  # the direct-request ledger write runs in a worker thread
        rows = h.auth.ledger.usage(group_by=("key", "model"))
        if sum(r["requests"] for r in rows) == 3:
            break
        await asyncio.sleep(0.02)
    mine = (await h.http.get("/v1/usage", params={"group_by": "model"},
                             headers={"authorization": f"Bearer {a.secret}"})).json()
    assert {r["model"] for r in mine["data"]} == {"fake-llm", "fake-embed"}
    assert mine["total"]["requests"] == 2 and mine["total"]["cost_usd"] > 0  # never a silent $0
    other = await h.http.get("/v1/usage", params={"key": b.record.key_id},
                             headers={"authorization": f"Bearer {a.secret}"})
    assert other.status_code == 400
    bad = await h.http.get("/v1/usage", params={"group_by": "colour"}, headers={"authorization": f"Bearer {a.secret}"})
    assert bad.status_code == 400 and "colour" in bad.json()["error"]["message"]
