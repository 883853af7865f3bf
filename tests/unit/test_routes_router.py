"""The HTTP side of routing and keys in-process: route names, route/cost headers, the auth modes
(401, fail closed), scopes (403), budgets and rate limits (402/429), spend of direct requests, and
/v1/usage. The real Router deployment runs in tests/e2e/test_router.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from ray_app.accounting.config import AuthConfig
from ray_app.accounting.keys import KeyStore, Scopes
from ray_app.accounting.ledger import Ledger, LedgerEntry
from ray_app.accounting.limits import RateWindows
from ray_app.accounting.recorder import SpendRecorder
from ray_app.router.config import RouterConfig
from ray_app.router.service import RouterService
from ray_app.serve.auth import Auth
from ray_app.serve.config import GatewayConfig
from ray_app.serve.documents_api import DocumentsService
from ray_app.serve.openai_api import OpenAIService
from ray_app.serve.protocol import ModelCard
from ray_app.serve.routes import HealthReport, build_api
from tests.fakes import FakeEmbedder, FakeLLM

ROUTER = RouterConfig.parse({
    "targets": [{"name": "local", "kind": "local", "model": "fake-llm", "context_window": 4096, "hourly_rate_usd": 3.6}],
    "routes": {"auto": {"targets": ["local"]}, "capped": {"targets": ["local"], "max_tokens": 16, "max_n": 1}},
})


class Harness:
    def __init__(self, tmp_path, mode: str = "open", cors: list[str] | None = None, **auth):
        path = tmp_path / "ledger.sqlite"
        self.config = AuthConfig(mode=mode, default_rpm=1000, default_tpm=1_000_000, local_hourly_rate_usd=36.0, **auth)
        self.keys = KeyStore(path)
        self.ledger = Ledger(path)
        windows = RateWindows(self.config.default_rpm, self.config.default_tpm)
        self.auth = Auth(self.config, self.keys, windows)
        self.llm = FakeLLM()
        recorder = SpendRecorder(self.config, self.ledger, local_rates=ROUTER.local_rates(), windows=windows)
        cards = {"fake-llm": ModelCard(id="fake-llm", kind="llm"), "fake-embed": ModelCard(id="fake-embed",
                                                                                          kind="embedding")}
        self.documents = RecordingKnowledge()
        self.service = OpenAIService({"fake-llm": self.llm}, {"fake-embed": FakeEmbedder()}, cards, recorder=recorder,
                                     router=RouterService(ROUTER), documents=DocumentsService(self.documents))

        async def health() -> HealthReport:
            return HealthReport(True)

        async def system_status() -> dict:
            return {"object": "system.status", "nodes": [{"address": "10.0.0.7"}]}

        app = build_api(self.service, GatewayConfig(cors_allow_origins=cors or [], max_request_bytes=2048), health,
                        {"/v1/collections": 4096}, system_status, auth=self.auth, ledger=self.ledger)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    def client(self, key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://test/v1", api_key=key, http_client=self.http, max_retries=0)

    def bearer(self, secret: str) -> dict:
        return {"authorization": f"Bearer {secret}"}


class RecordingKnowledge:
    """A knowledge backend that records what the scoped service let through."""

    def __init__(self):
        self.calls: list[tuple] = []

    async def retrieve(self, query, options):
        self.calls.append(("retrieve", options.collection, options.filter.sensitivity))
        return []

    async def augment(self, messages, options):
        self.calls.append(("augment", options.collection, options.filter.sensitivity))
        return messages, [], []

    async def ingest_file(self, collection, filename, data, sensitivity):
        from ray_app.documents.report import FileOutcome

        self.calls.append(("upload", collection, len(data)))
        return FileOutcome(source=f"upload://{collection}/{filename}", path=filename, status="indexed")

    async def collections(self):
        return [{"name": "docs"}, {"name": "hr"}]

    async def create_collection(self, name, default_sensitivity, embedder):
        self.calls.append(("create", name))
        return {"name": name}

    async def drop_collection(self, name):
        self.calls.append(("drop", name))

    async def delete_document(self, collection, doc_id):
        self.calls.append(("delete", collection, doc_id))
        return 1

    async def documents(self, collection, limit, after):
        self.calls.append(("documents", collection, limit, after))
        return {"object": "list", "data": [], "has_more": False, "last_id": None}


@pytest.fixture
def h(tmp_path) -> Harness:
    return Harness(tmp_path)


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


async def test_a_route_name_is_decided_here_with_route_and_cost_headers(h: Harness):
    response = await h.http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Paris is the capital."
    assert response.headers["x-ray-app-route"] == "auto/local"
    assert "candidates" in response.headers["x-ray-app-reason"]
    assert float(response.headers["x-ray-app-cost-usd"]) > 0
    # a served model's own name still goes straight to it
    direct = await h.http.post("/v1/chat/completions", json=CHAT | {"model": "fake-llm"})
    assert direct.status_code == 200 and "x-ray-app-route" not in direct.headers
    assert float(direct.headers["x-ray-app-cost-usd"]) > 0
    models = {m.id: m.kind for m in (await h.client().models.list()).data}
    assert models["auto"] == "route" and models["fake-llm"] == "llm"
    assert (await h.client().models.retrieve("auto")).model_extra["kind"] == "route"


async def test_a_routed_stream_carries_the_route_headers_and_ends_with_done(h: Harness):
    async with h.http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response:
        assert response.headers["x-ray-app-route"] == "auto/local"
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    words = [json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    assert "".join(words) == "Paris is the capital."


async def test_routing_errors_keep_openai_format_and_status(h: Harness):
    response = await h.http.post("/v1/chat/completions", json=CHAT | {"max_tokens": 5000})
    assert response.status_code == 400  # over every target's context window: refused by the policy
    assert response.json()["error"]["code"] == "context_length_exceeded"
    h.llm.fail_after = 0  # the only local target's replica died
    response = await h.http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "no_target_available"


async def test_open_mode_admits_anonymous_callers_and_still_checks_the_keys_it_is_sent(h: Harness):
    assert (await h.http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    new = h.keys.create("team-a")
    assert (await h.client().chat.completions.create(**CHAT)).choices  # the SDK's dummy token: anonymous
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        await h.client(new.secret[:-2] + "xx").chat.completions.create(**CHAT)
    assert (await h.http.get("/health")).json()["auth"] == "open"


async def test_keys_mode_fails_closed_with_or_without_keys(tmp_path):
    h = Harness(tmp_path, mode="keys")
    # no key exists yet: every /v1 route is refused, deletes and the cluster status included
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/system/status"),
                         ("DELETE", "/v1/collections/docs/documents/x"), ("GET", "/v1/usage")):
        response = await h.http.request(method, path, json=CHAT if method == "POST" else None)
        assert response.status_code == 401, (path, response.text)
        assert "ray-app keys create" in response.json()["error"]["message"]
    new = h.keys.create("team-a")
    ok = await h.client(new.secret).chat.completions.with_raw_response.create(**CHAT)
    assert ok.headers["x-ray-app-route"] == "auto/local"
    h.keys.revoke(new.record.key_id)  # the last key gone: closed again, not open
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        await h.client(new.secret).chat.completions.create(**CHAT)
    with pytest.raises(openai.AuthenticationError):
        await h.client().chat.completions.create(**CHAT)
    health = await h.http.get("/health")
    assert health.status_code == 200 and health.json()["auth"] == "keys"  # probes stay open


async def test_auth_runs_on_the_headers_before_any_body_is_read(tmp_path):
    h = Harness(tmp_path, mode="keys")
    read = []

    async def body():
        read.append(1)
        yield b"x" * 100

    response = await h.http.post("/v1/collections/docs/documents", content=body(),
                                 headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 401 and not read


async def test_callers_are_admitted_on_the_event_loop_without_a_thread_hop(tmp_path, monkeypatch):
    # A hop to a worker thread waits for the GIL on a loop busy with streams: admission must not take one.
    offloaded, to_thread = [], asyncio.to_thread

    async def recording(fn, *args, **kwargs):
        offloaded.append(getattr(fn, "__qualname__", repr(fn)))
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", recording)
    for mode in ("open", "keys"):
        h = Harness(tmp_path / mode, mode=mode)
        new = h.keys.create("team-a", tpm=10_000)
        assert (await h.client(new.secret).chat.completions.with_raw_response.create(**CHAT)).status_code == 200
        if mode == "open":
            assert (await h.client().chat.completions.with_raw_response.create(**CHAT)).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            await h.client(new.secret[:-2] + "xx").chat.completions.create(**CHAT)
        assert h.ledger.usage(key_id=new.record.key_id, group_by=())[0]["requests"] == 1  # the key was charged
    assert not [name for name in offloaded if "caller" in name or "authenticate" in name], offloaded


async def test_cors_preflights_are_answered_without_a_key(tmp_path):
    h = Harness(tmp_path, mode="keys", cors=["http://console.example"])
    preflight = await h.http.options("/v1/chat/completions", headers={
        "origin": "http://console.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://console.example"
    refused = await h.http.post("/v1/chat/completions", json=CHAT, headers={"origin": "http://console.example"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "http://console.example"  # the browser can read why


async def test_uploads_are_not_charged_a_token_estimate(tmp_path):
    h = Harness(tmp_path, mode="keys")
    new = h.keys.create("uploader", tpm=100, scopes=Scopes(write=("docs",)))
    files = {"file": ("notes.md", b"# notes\n" + b"text " * 700, "text/markdown")}  # ~3.5 KB > 100 tpm x 4 chars
    for _ in range(3):
        response = await h.http.post("/v1/collections/docs/documents", files=files, headers=h.bearer(new.secret))
        assert response.status_code == 201, response.text


async def test_route_body_limits_match_whole_path_segments(h: Harness):
    big = {"file": ("a.md", b"x" * 3000, "text/markdown")}  # over the 2048 default, under the 4096 upload limit
    assert (await h.http.post("/v1/collections/docs/documents", files=big)).status_code == 201
    response = await h.http.post("/v1/collectionsX/docs/documents", files=big)
    assert response.status_code == 413  # not the upload route: the default limit applies


async def test_scopes_decide_what_a_key_may_touch(tmp_path):
    h = Harness(tmp_path, mode="keys")
    reader = h.keys.create("reader", scopes=Scopes(read=("docs",)))
    admin = h.keys.create("admin", scopes=Scopes(admin=True))
    cleared = h.keys.create("cleared", scopes=Scopes(clearance="confidential"))
    as_reader, as_admin = h.bearer(reader.secret), h.bearer(admin.secret)

    retrieve = {"collection": "docs", "query": "pay"}
    assert (await h.http.post("/v1/retrieve", json=retrieve, headers=as_reader)).status_code == 200
    assert h.documents.calls[-1] == ("retrieve", "docs", ["public", "internal"])  # no confidential chunk
    assert (await h.http.post("/v1/retrieve", json=retrieve | {"collection": "hr"}, headers=as_reader)).status_code == 403
    asked = retrieve | {"filter": {"sensitivity": ["confidential"]}}
    response = await h.http.post("/v1/retrieve", json=asked, headers=as_reader)
    assert response.status_code == 403 and "clearance" in response.json()["error"]["message"]
    assert (await h.http.post("/v1/retrieve", json=asked, headers=h.bearer(cleared.secret))).status_code == 200
    # RAG goes through the same door
    rag = CHAT | {"rag": {"collection": "docs"}}
    assert (await h.http.post("/v1/chat/completions", json=rag, headers=as_reader)).status_code == 200
    assert h.documents.calls[-1] == ("augment", "docs", ["public", "internal"])

    files = {"file": ("a.md", b"# a\n", "text/markdown")}
    response = await h.http.post("/v1/collections/docs/documents", files=files, headers=as_reader)
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    for method, path in (("DELETE", "/v1/collections/docs/documents/x"), ("GET", "/v1/system/status"),
                         ("DELETE", "/v1/collections/docs")):
        assert (await h.http.request(method, path, headers=as_reader)).status_code == 403, path
        assert (await h.http.request(method, path, headers=as_admin)).status_code == 200, path
    listing = "/v1/collections/{}/documents"
    assert (await h.http.get(listing.format("docs"), params={"limit": 5}, headers=as_reader)).status_code == 200
    assert h.documents.calls[-1] == ("documents", "docs", 5, None)
    assert (await h.http.get(listing.format("hr"), headers=as_reader)).status_code == 403
    assert (await h.http.get(listing.format("docs"), params={"limit": 0}, headers=as_reader)).status_code == 400
    created = await h.http.post("/v1/collections", json={"name": "new"}, headers=as_admin)
    assert created.status_code == 201
    listed = (await h.http.get("/v1/collections", headers=as_reader)).json()["data"]
    assert [c["name"] for c in listed] == ["docs"]  # only what it may read


async def test_a_confidential_key_keeps_routes_local(tmp_path):
    h = Harness(tmp_path)
    new = h.keys.create("legal", confidential=True)
    response = await h.http.post("/v1/chat/completions", json=CHAT, headers=h.bearer(new.secret))
    assert "API key is confidential" in response.headers["x-ray-app-reason"]


async def test_a_spent_budget_is_402_and_a_rate_limit_is_429_with_retry_after(h: Harness):
    spender = h.keys.create("spender", budget_usd=0.01)
    h.ledger.record(LedgerEntry(spender.record.key_id, "auto", "local", "fake-llm", 1, 1, 0.02, 0.1, "ok"))
    with pytest.raises(openai.APIStatusError) as exc:
        await h.client(spender.secret).chat.completions.create(**CHAT)
    assert exc.value.status_code == 402 and exc.value.body["code"] == "budget_exceeded"
    assert "$0.0200 of its $0.01 monthly budget" in exc.value.body["message"]

    limited = h.keys.create("limited", rpm=2)
    for _ in range(2):
        await h.client(limited.secret).chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError) as exc:
        await h.client(limited.secret).chat.completions.create(**CHAT)
    assert exc.value.body["code"] == "rate_limit_exceeded_rpm"
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60


async def test_caps_on_n_and_max_tokens_per_key_and_route(h: Harness):
    capped = h.keys.create("capped", max_tokens=8, max_n=2)
    client = h.client(capped.secret)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(**CHAT | {"model": "fake-llm"}, n=3)
    assert exc.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(**CHAT | {"model": "fake-llm"}, max_tokens=9)
    assert exc.value.body["param"] == "max_tokens"
    await client.chat.completions.create(**CHAT | {"model": "fake-llm"})
    assert h.llm.requests[-1].max_tokens == 8  # the cap is also the default
    with pytest.raises(openai.BadRequestError):  # the route's own cap (16) for anyone
        await h.client().chat.completions.create(**CHAT | {"model": "capped"}, max_tokens=17)
    with pytest.raises(openai.BadRequestError):  # and the server's (auth.max_n, 8)
        await h.client().chat.completions.create(**CHAT | {"model": "fake-llm"}, n=9)


async def test_a_request_over_the_keys_per_request_ceiling_is_402(h: Harness):
    frugal = h.keys.create("frugal", max_request_usd=1e-9)
    with pytest.raises(openai.APIStatusError) as exc:
        await h.client(frugal.secret).chat.completions.create(**CHAT | {"model": "fake-llm"}, max_tokens=10)
    assert exc.value.status_code == 402 and exc.value.body["code"] == "cost_ceiling_exceeded"
    with pytest.raises(openai.APIStatusError) as exc:  # routed: no target fits under it
        await h.client(frugal.secret).chat.completions.create(**CHAT, max_tokens=10)
    assert exc.value.status_code == 402 and "ceiling" in exc.value.body["message"]


async def test_direct_requests_are_charged_and_usage_is_per_key(h: Harness):
    a, b = h.keys.create("a"), h.keys.create("b")
    admin = h.keys.create("admin", scopes=Scopes(admin=True))
    await h.client(a.secret).chat.completions.create(**CHAT | {"model": "fake-llm"})
    await h.client(a.secret).embeddings.create(model="fake-embed", input=["one two"])
    await h.client(b.secret).chat.completions.create(**CHAT | {"model": "fake-llm"})
    # written before each answer: no waiting
    assert sum(r["requests"] for r in h.ledger.usage(group_by=("key",))) == 3
    mine = (await h.http.get("/v1/usage", params={"group_by": "model"}, headers=h.bearer(a.secret))).json()
    assert {r["model"] for r in mine["data"]} == {"fake-llm", "fake-embed"}
    assert mine["total"]["requests"] == 2 and mine["total"]["cost_usd"] > 0  # never a silent $0
    other = await h.http.get("/v1/usage", params={"key": b.record.key_id}, headers=h.bearer(a.secret))
    assert other.status_code == 400
    everyone = (await h.http.get("/v1/usage", params={"group_by": "key"}, headers=h.bearer(admin.secret))).json()
    assert everyone["total"]["requests"] == 3
    bad = await h.http.get("/v1/usage", params={"group_by": "colour"}, headers=h.bearer(a.secret))
    assert bad.status_code == 400 and "colour" in bad.json()["error"]["message"]


async def test_rate_limits_survive_concurrent_callers(h: Harness):
    key = h.keys.create("busy", rpm=10_000)
    results = await asyncio.gather(*(h.http.post("/v1/chat/completions", json=CHAT | {"model": "fake-llm"},
                                                 headers=h.bearer(key.secret)) for _ in range(30)))
    assert {r.status_code for r in results} == {200}


async def test_keys_mode_guards_every_path_but_the_public_ones_under_a_route_prefix(tmp_path):
    # Serve mounts an app under its route prefix: the auth must judge the path inside the app, and
    # close any path it does not know to be public
    h = Harness(tmp_path, mode="keys")
    app = h.http._transport.app
    prefixed = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/locked"),
                                 base_url="http://test")
    for path in ("/locked/v1/embeddings", "/locked/v1/models", "/locked/v2/anything", "/locked/"):
        response = await prefixed.request("POST" if "embeddings" in path else "GET", path,
                                          json={"model": "fake-embed", "input": "x"})
        assert response.status_code == 401, (path, response.status_code)
    assert (await prefixed.get("/locked/health")).status_code == 200
    assert (await prefixed.get("/locked/openapi.json")).status_code == 200


async def test_chats_are_captured_only_for_keys_that_opt_in(tmp_path):
    from ray_app.datasets.build import read_conversations
    from ray_app.datasets.capture import CaptureLog

    h = Harness(tmp_path)
    h.service.capture = CaptureLog(tmp_path / "captures")
    quiet, keen = h.keys.create("quiet"), h.keys.create("keen", capture=True, confidential=True)
    await h.client(quiet.secret).chat.completions.create(**CHAT | {"model": "fake-llm"})
    assert not (tmp_path / "captures").exists()  # off by default
    await h.client(keen.secret).chat.completions.create(**CHAT | {"model": "fake-llm"})
    stream = await h.client(keen.secret).chat.completions.create(**CHAT, stream=True)
    _ = [c async for c in stream]
    records = read_conversations(tmp_path / "captures")
    assert len(records) == 2
    assert [r.answer for r in records] == ["Paris is the capital."] * 2
    assert records[0].question == "hello" and records[1].metadata["route"] == "auto"
    assert {r.metadata["sensitivity"] for r in records} == {"confidential"}  # a confidential key's chats
    assert {r.metadata["key_id"] for r in records} == {keen.record.key_id}


async def test_a_long_prompt_is_scanned_for_pii_off_the_event_loop_and_a_short_one_on_it(tmp_path, monkeypatch):
    from ray_app.serve import openai_api
    from ray_app.serve.auth import Caller
    from ray_app.serve.protocol import ChatCompletionRequest

    offloaded, to_thread = [], asyncio.to_thread

    async def recording(fn, *args, **kwargs):
        offloaded.append(getattr(fn, "__name__", repr(fn)))
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(openai_api.asyncio, "to_thread", recording)
    h = Harness(tmp_path)
    h.llm.max_model_len = 10_000
    for text, length in (("hello", 120), ("hello " * 2000, 12_060)):
        request = ChatCompletionRequest(model="auto", messages=[{"role": "user", "content": text}], max_tokens=4)
        await h.service.chat(request, Caller(headers={"content-length": str(length)}))
    assert offloaded.count("features") == 1  # the long one only
