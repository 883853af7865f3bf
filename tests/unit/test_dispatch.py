"""Routed and direct generation through ``OpenAIService``: fallback chains, privacy under failure,
breakers, true cost, the spend ledger, and one streaming table shared by every path.

Local targets are ``FakeLLM``s (the objects and SSE strings of ray.serve.llm's LLMServer); cloud
targets go through ``CloudProviders`` (the Router deployment's class) with scripted ``Provider``s
whose retry loop is the real one, with an injected sleep. The wire protocols are covered in
test_router_providers.py and end to end in tests/e2e/test_router.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ray_app.accounting.config import AuthConfig
from ray_app.accounting.keys import KeyRecord
from ray_app.accounting.ledger import Ledger
from ray_app.accounting.recorder import CloudPrice, SpendRecorder
from ray_app.router.config import RouterConfig
from ray_app.router.providers import Provider, ProviderError, RetryPolicy
from ray_app.router.service import RouterService
from ray_app.serve.auth import Caller
from ray_app.serve.errors import APIError, ContextLengthExceededError
from ray_app.serve.gateway import InProcessLLM
from ray_app.serve.openai_api import OpenAIService, WithHeaders
from ray_app.serve.protocol import ChatCompletionRequest, ModelCard
from ray_app.serve.router import CloudProviders
from tests.fakes import FakeLLM

CONFIG = RouterConfig.parse({
    "targets": [
        {"name": "local", "kind": "local", "model": "small", "context_window": 4096, "hourly_rate_usd": 3.6},
        {"name": "cloud-a", "kind": "openai", "model": "mini", "api_key_env": "K", "context_window": 16000,
         "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0},
        {"name": "cloud-b", "kind": "bedrock", "model": "claude", "region": "us-east-1", "context_window": 16000,
         "price_in_per_mtok": 3.0, "price_out_per_mtok": 4.0},
    ],
    "routes": {
        "cloud": {"targets": ["cloud-a", "cloud-b"], "prefer": "order"},
        "auto": {"targets": ["local", "cloud-a", "cloud-b"], "prefer": "order"},
        "private": {"targets": ["local"], "allow_cloud": False},
    },
    "policy": {"breaker": {"failure_threshold": 2, "cooldown_s": 60}},
})
USAGE = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _no_sleep(_: float) -> None:
    return None


class Scripted(Provider):
    """Fails the next ``failures`` attempts with ``error``, then answers; records what it was sent."""

    def __init__(self, name: str, clock: Clock, failures: int = 0, error: ProviderError | None = None,
                 takes_s: float = 1.0, max_retries: int = 0, usage: dict | None = None):
        super().__init__(CONFIG.target(name), RetryPolicy(max_retries=max_retries, sleep=_no_sleep))
        self.clock, self.failures, self.takes_s, self.usage = clock, failures, takes_s, usage or USAGE
        self.error = error or ProviderError(name, "upstream error", 503, retryable=True)
        self.sent: list[dict[str, Any]] = []

    def _next(self, request):
        self.sent.append(request)
        self.clock.now += self.takes_s
        if self.failures:
            self.failures -= 1
            raise self.error

    async def _chat_once(self, request):
        self._next(request)
        return {"id": "c", "object": "chat.completion", "created": 0, "model": self.target.model, "usage": self.usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hi from {self.target.name}"},
                             "finish_reason": "stop"}]}

    async def _stream_once(self, request):
        self._next(request)
        for word in ("hi ", "there"):
            yield {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": self.target.model,
                   "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
        yield {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": self.target.model,
               "choices": [], "usage": self.usage}


class ClockLLM(FakeLLM):
    """A local model whose every request takes ``takes_s`` of the test's clock."""

    def __init__(self, clock: Clock, takes_s: float = 1.0, failures: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.clock, self.takes_s, self.failures = clock, takes_s, failures

    def chat(self, request):
        self.clock.now += self.takes_s
        if self.failures:
            self.failures -= 1
            from tests.unit.test_routes import _Raising
            from ray.exceptions import ActorDiedError

            self.requests.append(request)
            return _Raising(ActorDiedError())
        return super().chat(request)


class InProcessServer:
    """What ``InProcessLLM`` calls in a replica that hosts the gateway: an LLMServer's ``chat`` and
    ``completions``, which return the engine's generator when awaited. Closing it early aborts the
    engine's request, as vLLM does on ``GeneratorExit``."""

    def __init__(self, llm: FakeLLM):
        self.llm = llm

    async def chat(self, request):
        return self._generator(self.llm.chat(request))

    async def completions(self, request):
        return self._generator(self.llm.completions(request))

    @staticmethod
    async def _generator(stream):
        finished = False
        try:
            async for item in stream:
                yield item
            finished = True
        finally:
            if not finished:
                stream.cancel()


class Harness:
    def __init__(self, tmp_path, clock: Clock, local: FakeLLM | None = None, backend: str = "handle", **cloud: Scripted):
        self.clock = clock
        self.ledger = Ledger(tmp_path / "ledger.sqlite")
        self.recorder = SpendRecorder(
            AuthConfig(local_hourly_rate_usd=36.0), self.ledger, local_rates=CONFIG.local_rates(),
            cloud_prices={t.name: CloudPrice(t.price_in_per_mtok, t.price_out_per_mtok)
                          for t in CONFIG.targets if t.kind != "local"}, clock=clock)
        self.router = RouterService(CONFIG, clock=clock)
        self.cloud = CloudProviders(CONFIG, environ={"K": "sk-test"})
        self.cloud.providers = dict(cloud)
        self.cloud.unavailable = {n: "not scripted" for n in ("cloud-a", "cloud-b") if n not in cloud}
        self.router.set_deployed(self.cloud.deployed())
        self.local = local or ClockLLM(clock)
        # a handle call to the LLM deployment, or the engine in the gateway's own process (gateway.host_llm)
        llm = self.local if backend == "handle" else InProcessLLM(InProcessServer(self.local), "small")
        self.service = OpenAIService({"small": llm}, {}, {"small": ModelCard(id="small")},
                                     recorder=self.recorder, router=self.router, cloud=self.cloud, clock=clock)

    async def chat(self, text: str = "Tell me a joke", model: str = "auto", caller: Caller | None = None,
                   **extra) -> WithHeaders:
        request = ChatCompletionRequest(model=model, messages=[{"role": "user", "content": text}], **extra)
        return await self.service.chat(request, caller or Caller())

    def rows(self, *group_by: str) -> list[dict]:
        return self.ledger.usage(group_by=group_by)


def _key(key_id: str = "team-a", **extra) -> Caller:
    record = KeyRecord(key_id, key_id, 0.0, **extra)
    return Caller(record, record.scopes)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_first_target_answers_and_the_ledger_has_the_true_cloud_cost(tmp_path, clock):
    h = Harness(tmp_path, clock, **{"cloud-a": Scripted("cloud-a", clock), "cloud-b": Scripted("cloud-b", clock)})
    answer = await h.chat(model="cloud", caller=_key())
    assert answer.result["choices"][0]["message"]["content"] == "hi from cloud-a"
    assert answer.headers["x-ray-app-route"] == "cloud/cloud-a"
    assert float(answer.headers["x-ray-app-cost-usd"]) == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    [row] = h.rows("key", "target", "status")
    assert row == {"key": "team-a", "target": "cloud-a", "status": "ok", "requests": 1, "prompt_tokens": 1000,
                   "completion_tokens": 500, "cost_usd": pytest.approx(0.002)}


async def test_a_failing_target_falls_back_to_the_next_and_says_so(tmp_path, clock):
    a = Scripted("cloud-a", clock, failures=3, max_retries=2)  # fails every retry
    b = Scripted("cloud-b", clock)
    h = Harness(tmp_path, clock, **{"cloud-a": a, "cloud-b": b})
    answer = await h.chat(model="cloud")
    assert len(a.sent) == 3 and len(b.sent) == 1  # retried with backoff, then fell back
    assert answer.headers["x-ray-app-route"] == "cloud/cloud-b"
    assert "fallback after cloud-a" in answer.headers["x-ray-app-reason"]
    assert h.router.health_report()["cloud-a"]["error_rate"] > 0
    assert float(answer.headers["x-ray-app-cost-usd"]) == pytest.approx((1000 * 3.0 + 500 * 4.0) / 1e6)


async def test_a_bad_request_is_not_retried_elsewhere_and_does_not_count_against_the_target(tmp_path, clock):
    a = Scripted("cloud-a", clock, failures=5, error=ProviderError("cloud-a", "bad temperature", 400))
    b = Scripted("cloud-b", clock)
    h = Harness(tmp_path, clock, **{"cloud-a": a, "cloud-b": b})
    for _ in range(5):
        with pytest.raises(APIError, match="bad temperature") as exc:
            await h.chat(model="cloud")
        assert exc.value.status_code == 400
    assert not b.sent
    # five client errors are not five failures: the breaker stays closed
    assert h.router.health.snapshot()["cloud-a"].breaker == "closed"
    assert (await h.chat(model="cloud")).headers["x-ray-app-route"] == "cloud/cloud-a"


async def test_prompts_over_the_context_cannot_open_the_local_breaker(tmp_path, clock):
    # the denial of service of issue 9: client errors on `private` kept every confidential request out
    h = Harness(tmp_path, clock, local=ClockLLM(clock, max_model_len=8))
    for _ in range(6):
        with pytest.raises(ContextLengthExceededError):
            await h.chat("word " * 20, model="private")
    assert h.router.health.snapshot()["local"].breaker == "closed"
    answer = await h.chat("short", model="private")
    assert answer.headers["x-ray-app-route"] == "private/local"


async def test_a_pii_request_never_falls_back_to_cloud_even_when_local_fails(tmp_path, clock):
    a, b = Scripted("cloud-a", clock), Scripted("cloud-b", clock)
    h = Harness(tmp_path, clock, local=ClockLLM(clock, failures=1), **{"cloud-a": a, "cloud-b": b})
    with pytest.raises(APIError, match="local") as exc:
        await h.chat("Charge card 4111 1111 1111 1111 for the order")
    assert exc.value.status_code == 503 and exc.value.code == "no_target_available"
    assert len(h.local.requests) == 1 and not a.sent and not b.sent
    # and a route with only cloud targets refuses outright
    with pytest.raises(APIError) as exc:
        await h.chat("card 4111 1111 1111 1111", model="cloud")
    assert exc.value.code == "no_local_target"
    assert not a.sent and not b.sent
    assert [r["status"] for r in h.rows("status")] == ["error"]  # the request that reached a target


async def test_pii_anywhere_in_the_request_keeps_it_local(tmp_path, clock):
    a = Scripted("cloud-a", clock)
    h = Harness(tmp_path, clock, **{"cloud-a": a, "cloud-b": Scripted("cloud-b", clock)})
    tools = [{"type": "function", "function": {"name": "lookup", "description": "mail jane@corp.example",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for extra in ({"tools": tools}, {"user": "+44 20 7946 0958"}):
        with pytest.raises(APIError) as exc:
            await h.chat("hello", model="cloud", **extra)
        assert exc.value.code == "no_local_target"
    assert not a.sent


async def test_confidential_header_key_and_retrieved_chunks_keep_requests_local(tmp_path, clock):
    a = Scripted("cloud-a", clock)
    h = Harness(tmp_path, clock, **{"cloud-a": a})
    for caller in (Caller(headers={"x-confidential": "true"}), _key(confidential=True)):
        with pytest.raises(APIError) as exc:
            await h.chat(model="cloud", caller=caller)
        assert exc.value.code == "no_local_target"
    answer = await h.chat(caller=_key(confidential=True))
    assert answer.headers["x-ray-app-route"] == "auto/local" and not a.sent
    features = h.router.features({"model": "cloud", "messages": []}, retrieved_sensitivities=["public", "confidential"])
    assert features.local_only


async def test_the_dispatcher_refuses_a_cloud_attempt_for_a_local_only_request(tmp_path, clock):
    # the policy never puts a cloud target in such a chain; the dispatcher checks again, whatever the chain
    from ray_app.router.policy import PrivacyError
    from ray_app.serve.dispatch import Plan, TargetRef

    a = Scripted("cloud-a", clock)
    h = Harness(tmp_path, clock, **{"cloud-a": a})
    features = h.router.features({"model": "cloud", "messages": [{"role": "user", "content": "a@b.io"}]})
    plan = Plan("cloud", [TargetRef("cloud-a", "cloud", "cloud-a", "mini", 10)], features=features)
    from ray_app.accounting.recorder import Outcome

    with pytest.raises(PrivacyError):
        await h.service.dispatcher.complete(plan, None, {"messages": []}, Outcome("cloud", "cloud-a", "mini"))
    assert not a.sent


async def test_an_open_breaker_skips_the_target_until_its_cooldown(tmp_path, clock):
    a = Scripted("cloud-a", clock, failures=2)
    b = Scripted("cloud-b", clock)
    h = Harness(tmp_path, clock, **{"cloud-a": a, "cloud-b": b})
    for _ in range(2):  # two failures open cloud-a's breaker (threshold 2)
        await h.chat(model="cloud")
    assert h.router.health_report()["cloud-a"]["status"] == "failing"
    answer = await h.chat(model="cloud")
    assert len(a.sent) == 2 and answer.headers["x-ray-app-route"] == "cloud/cloud-b"  # not even tried
    clock.now += 61  # cooldown over: half-open, ranked last; a probe reaches it when cloud-b fails
    assert h.router.decide(h.router.features({"model": "cloud", "messages": []})).chain == ["cloud-b", "cloud-a"]
    b.failures = 1
    answer = await h.chat(model="cloud")
    assert answer.headers["x-ray-app-route"] == "cloud/cloud-a"
    assert h.router.health.snapshot()["cloud-a"].breaker == "closed"


async def test_local_cost_is_replica_time_and_direct_requests_pay_the_same_rate(tmp_path, clock):
    h = Harness(tmp_path, clock, local=ClockLLM(clock, takes_s=10.0))
    routed = await h.chat()
    assert float(routed.headers["x-ray-app-cost-usd"]) == pytest.approx(10.0 * 3.6 / 3600)  # $3.60/h replica
    direct = await h.chat(model="small")
    assert "x-ray-app-route" not in direct.headers
    assert float(direct.headers["x-ray-app-cost-usd"]) == pytest.approx(10.0 * 3.6 / 3600)  # one price per model


async def test_the_ledger_survives_a_restart(tmp_path, clock):
    h = Harness(tmp_path, clock, **{"cloud-a": Scripted("cloud-a", clock)})
    await h.chat(model="cloud", caller=_key("k"))
    h.ledger.close()
    with Ledger(tmp_path / "ledger.sqlite") as reopened:
        assert reopened.spend("k") == pytest.approx(0.002)


def test_targets_without_a_provider_are_reported_not_routed(tmp_path, clock):
    h = Harness(tmp_path, clock)
    h.cloud.unavailable = {"cloud-a": "environment variable K is not set", "cloud-b": "no AWS credentials"}
    h.router.set_deployed(h.cloud.deployed())
    report = h.router.health_report()
    assert report["cloud-a"] == {"status": "unavailable", "detail": "environment variable K is not set"}
    assert report["local"]["status"] == "ok"
    assert h.router.decide(h.router.features({"model": "auto", "messages": []})).chain == ["local"]


def test_the_router_deployment_deploys_only_targets_with_credentials():
    providers = CloudProviders(CONFIG, environ={})
    assert providers.deployed()["cloud-a"] == "target 'cloud-a': environment variable K is not set"
    assert "local" not in providers.deployed()
    with_key = CloudProviders(CONFIG, environ={"K": "sk-x"})
    assert with_key.deployed()["cloud-a"] is None


async def test_the_router_deployment_refuses_an_unknown_target():
    with pytest.raises(ProviderError, match="not set") as exc:
        await CloudProviders(CONFIG, environ={}).chat("cloud-a", {"messages": []})
    assert exc.value.status == 503
    import pickle

    again = pickle.loads(pickle.dumps(exc.value))  # crosses the Router handle intact
    assert (again.target, again.status, str(again)) == (exc.value.target, 503, str(exc.value))


# -- streams: one table for every path --------------------------------------------------------------

PATHS = {"direct": "small", "routed-local": "private", "routed-cloud": "cloud",
         "direct-in-process": "small", "routed-local-in-process": "private"}


def _backend(path: str) -> str:
    return "in-process" if path.endswith("in-process") else "handle"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("include_usage", [False, True])
async def test_streams_on_every_path(tmp_path, clock, path, include_usage):
    h = Harness(tmp_path, clock, backend=_backend(path), **{"cloud-a": Scripted("cloud-a", clock)})
    model = PATHS[path]
    answer = await h.chat("hello", model=model, stream=True, caller=_key(),
                          stream_options={"include_usage": True} if include_usage else None)
    assert ("x-ray-app-route" in answer.headers) == path.startswith("routed")
    events, rows_before_done = [], None
    async for text in answer.result:
        for event in filter(None, text.split("\n\n")):
            if event == "data: [DONE]":
                rows_before_done = h.ledger.count()
            events.append(event)
    assert events[-1] == "data: [DONE]" and rows_before_done == 1  # durable before the client hears the end
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ("hi there" if path == "routed-cloud" else "Paris is the capital.")
    assert (chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0) == include_usage
    [row] = h.rows("key", "status")
    assert row["key"] == "team-a" and row["status"] == "ok" and row["completion_tokens"] > 0 and row["cost_usd"] > 0


@pytest.mark.parametrize("path", PATHS)
async def test_a_client_leaving_mid_stream_is_charged_and_the_target_cancelled(tmp_path, clock, path):
    h = Harness(tmp_path, clock, local=ClockLLM(clock, takes_s=2.0, reply=" ".join(["w"] * 20)),
                backend=_backend(path), **{"cloud-a": Scripted("cloud-a", clock, takes_s=2.0)})
    answer = await h.chat("hello", model=PATHS[path], stream=True, caller=_key("quitter"))
    await anext(answer.result)  # one chunk, then the client goes away
    await answer.result.aclose()
    for _ in range(50):  # the charge is written off the cancelled request's task
        if h.ledger.count():
            break
        await asyncio.sleep(0.01)
    [row] = h.rows("key", "status")
    assert row["key"] == "quitter" and row["status"] == "incomplete"
    if path != "routed-cloud":
        assert row["cost_usd"] == pytest.approx(2.0 * 3.6 / 3600)  # the replica time it held
        for _ in range(50):  # an in-process generator is closed by a task of its own
            if h.local.streams[-1].cancelled:
                break
            await asyncio.sleep(0.01)
        assert h.local.streams[-1].cancelled
    assert h.recorder.share("small").in_flight == 0


async def test_streams_fail_over_before_the_first_chunk(tmp_path, clock):
    a = Scripted("cloud-a", clock, failures=1)
    b = Scripted("cloud-b", clock)
    h = Harness(tmp_path, clock, **{"cloud-a": a, "cloud-b": b})
    answer = await h.chat(model="cloud", stream=True)
    assert answer.headers["x-ray-app-route"] == "cloud/cloud-b" and "fallback after cloud-a" in answer.headers[
        "x-ray-app-reason"]
    _ = [t async for t in answer.result]
    [row] = h.rows("target")
    assert row["target"] == "cloud-b" and row["cost_usd"] == pytest.approx((1000 * 3.0 + 500 * 4.0) / 1e6)


async def test_a_cancelled_request_frees_its_replica_share(tmp_path, clock):
    class Hanging(FakeLLM):
        def chat(self, request):
            return _Hanging()

    h = Harness(tmp_path, clock, local=Hanging())
    task = asyncio.ensure_future(h.chat())
    await asyncio.sleep(0.01)
    assert h.recorder.share("small").in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.recorder.share("small").in_flight == 0


class _Hanging:
    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(3600)

    def cancel(self):
        pass


async def test_budgets_hold_concurrent_requests_to_what_is_left(tmp_path, clock):
    # each request reserves its worst case at admission: however many race, the key cannot overspend
    a = Scripted("cloud-a", clock, usage={"prompt_tokens": 20, "completion_tokens": 200, "total_tokens": 220})
    h = Harness(tmp_path, clock, **{"cloud-a": a})
    from ray_app.accounting.keys import KeyStore

    key = KeyStore(tmp_path / "ledger.sqlite").create("spender", budget_usd=0.01).record
    caller = Caller(key, key.scopes)
    worst = (10 * 1.0 + 2 * 100 * 2.0) / 1e6  # ~10 prompt tokens, n=2 x max_tokens 100 at cloud-a's prices

    async def one():
        try:
            return await h.chat("hi", model="cloud", caller=caller, max_tokens=100, n=2)
        except APIError as e:
            return e

    results = await asyncio.gather(*(one() for _ in range(40)))
    refused = [r for r in results if isinstance(r, APIError)]
    assert refused and all(r.status_code == 402 for r in refused)
    spent = h.ledger.spend(key.key_id)
    assert spent <= 0.01 + worst  # never more than one request's reservation over
