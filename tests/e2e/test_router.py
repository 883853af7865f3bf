"""The smart router in the real Serve graph: `model: auto` and other routes through the Router
deployment to local vLLM replicas and to cloud providers reached over their real wire protocols
(the loopback stand-ins record every request they get), with fallbacks, privacy, keys and spend."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e

CARD = "4111 1111 1111 1111"


@pytest.fixture
def client(served, clouds) -> openai.OpenAI:
    clouds.reset()
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, model: str, text: str, **kwargs):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=8, **kwargs)


def test_cloud_route_reaches_openai_and_reports_route_and_cost(client, clouds):
    raw = ask(client, "cloud", "Name a colour.")
    answer = raw.parse()
    assert answer.choices[0].message.content == "Hello from the OpenAI stand-in"
    assert raw.headers["x-ray-app-route"] == "cloud/openai-loop"
    usage = answer.usage
    assert float(raw.headers["x-ray-app-cost-usd"]) == pytest.approx(
        (usage.prompt_tokens * 1.0 + usage.completion_tokens * 2.0) / 1e6, rel=1e-3)
    [sent] = clouds.openai.requests
    assert sent.body["model"] == "gpt-loop" and sent.headers["authorization"] == "Bearer sk-loopback"


def test_azure_route_uses_the_deployment_path(client, clouds):
    raw = ask(client, "azure", "Name a colour.")
    assert raw.headers["x-ray-app-route"] == "azure/azure-loop"
    [sent] = clouds.openai.requests
    assert sent.path == "/openai/deployments/gpt-deploy/chat/completions"
    assert sent.query["api-version"] == "2024-10-21"


def test_a_failing_provider_falls_back_to_bedrock_over_sigv4(client, clouds):
    clouds.openai.fail_next(2, status=503)  # the first try and its one retry
    raw = ask(client, "cloud", "Name a colour.")
    assert raw.parse().choices[0].message.content == "Hello from the Bedrock stand-in"
    assert raw.headers["x-ray-app-route"] == "cloud/bedrock-loop"
    assert "fallback after openai-loop" in raw.headers["x-ray-app-reason"]
    [converse] = clouds.bedrock.requests
    assert converse.path == "/model/anthropic.claude-loop/converse"
    assert converse.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIALOOPBACK/")


def test_routed_streaming_through_bedrock(client, clouds):
    clouds.openai.fail_next(2, status=503)
    stream = client.chat.completions.create(
        model="cloud", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the Bedrock stand-in"
    assert chunks[-1].usage.completion_tokens > 0
    assert clouds.bedrock.requests[0].path.endswith("/converse-stream")


def test_local_models_answer_auto_and_private_routes(client, clouds):
    raw = ask(client, "private", "Say hello.")
    assert raw.headers["x-ray-app-route"] == "private/local-small"
    assert raw.parse().choices[0].message.content  # SmolLM2 answered
    assert float(raw.headers["x-ray-app-cost-usd"]) > 0  # replica time is never free
    assert not clouds.bodies()


def test_confidential_requests_never_reach_a_cloud_endpoint(client, clouds):
    # PII in the prompt: `auto` keeps it local, `cloud` has no local target and refuses
    raw = ask(client, "auto", f"My card is {CARD}, is that a Visa?")
    assert raw.headers["x-ray-app-route"] == "auto/local-small"
    assert "privacy" in raw.headers["x-ray-app-reason"]
    with pytest.raises(openai.APIStatusError) as exc:
        ask(client, "cloud", f"My card is {CARD}, is that a Visa?")
    assert exc.value.status_code == 503 and exc.value.body["code"] == "no_local_target"
    # the confidential header, even with a local target failing over would be cloud-only: refused
    with pytest.raises(openai.APIStatusError) as exc:
        ask(client, "cloud", "Quarterly numbers, internal only.", extra_headers={"X-Confidential": "true"})
    assert exc.value.status_code == 503
    assert not any(CARD in body or "Quarterly numbers" in body for body in clouds.bodies())
    assert not clouds.bodies()


def test_a_retrieved_confidential_chunk_keeps_rag_local(served, client, clouds):
    from ray_app.documents.config import IngestConfig
    from tests.e2e.test_documents import store_call

    config = IngestConfig.load(ROOT / "configs" / "ingest.yaml")
    name = f"router-{uuid.uuid4().hex[:8]}"
    store_call(config, "ensure_collection", name, 384, config.embedder)
    try:
        secret = b"# Merger\n\nProject Bluebird: we acquire Initech on March 3 for 41 million euros.\n"
        upload = httpx.post(f"{served.v1}/collections/{name}/documents", timeout=120, data={"sensitivity": "confidential"},
                            files={"file": ("merger.md", secret, "text/markdown")})
        assert upload.status_code == 201, upload.text
        rag = {"rag": {"collection": name, "top_k": 2}}
        with pytest.raises(openai.APIStatusError) as exc:
            ask(client, "cloud", "When do we acquire Initech?", extra_body=rag)
        assert exc.value.body["code"] == "no_local_target" and "confidential chunk" in exc.value.body["message"]
        raw = ask(client, "auto", "When do we acquire Initech?", extra_body=rag)
        assert raw.headers["x-ray-app-route"] == "auto/local-small"
        assert raw.parse().model_extra["citations"][0]["source"] == f"upload://{name}/merger.md"
        assert not any("Bluebird" in body or "Initech" in body for body in clouds.bodies())
    finally:
        store_call(config, "drop_collection", name)


def test_keys_budgets_and_spend(served, client, clouds):
    from ray_app.accounting.keys import KeyStore

    keys = KeyStore(served.args["auth"]["ledger_path"])
    team = keys.create("e2e-team", budget_usd=1.0)
    try:
        # the app is in open mode: a key that is sent identifies and charges its caller, a bad one is refused
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.v1, api_key=team.secret[:-3] + "xyz", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=served.v1, api_key=team.secret, max_retries=0, timeout=300)
        ask(keyed, "cloud", "Name a colour.")
        keyed.embeddings.create(model="all-minilm-l6-v2", input="spend me")
        # every row is durable before its answer: no waiting
        usage = httpx.get(served.v1 + "/usage", params={"group_by": "model,route"}, timeout=30,
                          headers={"authorization": f"Bearer {team.secret}"}).json()
        rows = {(r["model"], r["route"]): r for r in usage["data"]}
        assert rows[("gpt-loop", "cloud")]["cost_usd"] > 0 and rows[("gpt-loop", "cloud")]["requests"] == 1
        assert rows[("all-minilm-l6-v2", "direct")]["cost_usd"] > 0
        assert usage["total"]["requests"] == 2
        # a budget smaller than what the request may cost: refused at admission, before any call
        broke = keys.create("e2e-broke", budget_usd=1e-9)
        poor = openai.OpenAI(base_url=served.v1, api_key=broke.secret, max_retries=0, timeout=300)
        clouds.reset()
        with pytest.raises(openai.APIStatusError) as exc:
            ask(poor, "cloud", "Name a colour.")
        assert exc.value.status_code == 402 and "may cost up to" in exc.value.body["message"]
        assert not clouds.bodies()
    finally:
        for record in keys.list():  # leave the app open for the other tests
            if record.revoked_at is None:
                keys.revoke(record.key_id)
        keys.close()
    assert ask(client, "cloud", "Name a colour.").headers["x-ray-app-route"] == "cloud/openai-loop"


def test_health_reports_the_router_targets(served):
    health = httpx.get(served.base_url + "/health", timeout=30).json()
    assert set(health["targets"]) >= {"local-small", "openai-loop", "azure-loop", "bedrock-loop"}
    assert health["targets"]["local-small"]["status"] in ("ok", "degraded", "probing")
    assert "Router" in health["deployments"]
