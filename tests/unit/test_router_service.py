"""RouterService: fallback chains, privacy under failure, breakers, true cost and the spend ledger.

Providers here are scripted ``Provider`` subclasses (the retry loop is the real one, with an injected
sleep); the wire protocols are covered in test_router_providers.py and end to end in
tests/e2e/test_router.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from ray_app.router.config import RouterConfig
from ray_app.router.ledger import Ledger
from ray_app.router.policy import PrivacyError
from ray_app.router.providers import Provider, ProviderError, RetryPolicy
from ray_app.router.service import AllTargetsFailed, ReplicaShare, RouterService

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
                 takes_s: float = 1.0, max_retries: int = 0):
        super().__init__(CONFIG.target(name), RetryPolicy(max_retries=max_retries, sleep=_no_sleep))
        self.clock, self.failures, self.takes_s = clock, failures, takes_s
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
        return {"object": "chat.completion", "model": self.target.model, "usage": USAGE,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hi from {self.target.name}"},
                             "finish_reason": "stop"}]}

    async def _stream_once(self, request):
        self._next(request)
        for word in ("hi ", "there"):
            yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
        yield {"object": "chat.completion.chunk", "choices": [], "usage": USAGE}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        yield ledger


def make(ledger, clock, **providers: Scripted) -> RouterService:
    return RouterService(CONFIG, providers, ledger, clock=clock)


def request(text: str = "Tell me a joke", model: str = "auto", **extra) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def test_first_target_answers_and_the_ledger_has_the_true_cloud_cost(ledger, clock):
    router = make(ledger, clock, **{"cloud-a": Scripted("cloud-a", clock), "cloud-b": Scripted("cloud-b", clock)})
    body = request(model="cloud")
    routed = await router.chat(body, features=router.features(body), key_id="team-a")
    assert routed.info.target == "cloud-a" and routed.body["choices"][0]["message"]["content"] == "hi from cloud-a"
    assert routed.info.cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    headers = routed.info.headers()
    assert headers["x-ray-app-route"] == "cloud/cloud-a" and float(headers["x-ray-app-cost-usd"]) > 0
    [row] = ledger.usage(group_by=("key", "target", "status"))
    assert row == {"key": "team-a", "target": "cloud-a", "status": "ok", "requests": 1, "prompt_tokens": 1000,
                   "completion_tokens": 500, "cost_usd": pytest.approx(0.002)}


async def test_a_failing_target_falls_back_to_the_next_and_says_so(ledger, clock):
    a = Scripted("cloud-a", clock, failures=3, max_retries=2)  # fails every retry
    b = Scripted("cloud-b", clock)
    router = make(ledger, clock, **{"cloud-a": a, "cloud-b": b})
    body = request(model="cloud")
    routed = await router.chat(body, features=router.features(body))
    assert len(a.sent) == 3 and len(b.sent) == 1  # retried with backoff, then fell back
    assert routed.info.target == "cloud-b" and "cloud-a" in routed.info.fallbacks[0]
    assert "fallback after cloud-a" in routed.info.headers()["x-ray-app-reason"]
    assert router.health_report()["cloud-a"]["error_rate"] > 0
    assert routed.info.cost_usd == pytest.approx((1000 * 3.0 + 500 * 4.0) / 1e6)  # priced at cloud-b's rates


async def test_a_bad_request_is_not_retried_elsewhere(ledger, clock):
    a = Scripted("cloud-a", clock, failures=1, error=ProviderError("cloud-a", "bad temperature", 400))
    b = Scripted("cloud-b", clock)
    router = make(ledger, clock, **{"cloud-a": a, "cloud-b": b})
    body = request(model="cloud")
    with pytest.raises(ProviderError, match="bad temperature"):
        await router.chat(body, features=router.features(body))
    assert not b.sent


async def test_a_pii_request_never_falls_back_to_cloud_even_when_local_fails(ledger, clock):
    local, a, b = Scripted("local", clock, failures=1), Scripted("cloud-a", clock), Scripted("cloud-b", clock)
    router = make(ledger, clock, local=local, **{"cloud-a": a, "cloud-b": b})
    body = request("Charge card 4111 1111 1111 1111 for the order")
    features = router.features(body)
    assert features.local_only
    with pytest.raises(AllTargetsFailed, match="local"):
        await router.chat(body, features=features)
    assert len(local.sent) == 1 and not a.sent and not b.sent
    # and a route with only cloud targets refuses outright
    with pytest.raises(PrivacyError):
        await router.chat(request("card 4111 1111 1111 1111", model="cloud"),
                          features=router.features(request("card 4111 1111 1111 1111", model="cloud")))
    assert not a.sent and not b.sent
    assert [r["status"] for r in ledger.usage(group_by=("status",))] == ["upstream_error"]


async def test_confidential_header_key_and_retrieved_chunks_keep_requests_local(ledger, clock):
    local, a = Scripted("local", clock), Scripted("cloud-a", clock)
    router = make(ledger, clock, local=local, **{"cloud-a": a})
    body = request(model="cloud")
    for features in (router.features(body, headers={"X-Confidential": "true"}),
                     router.features(body, confidential_key=True),
                     router.features(body, retrieved_sensitivities=["public", "confidential"])):
        with pytest.raises(PrivacyError):
            await router.chat(body, features=features)
    routed = await router.chat(request(), features=router.features(request(), confidential_key=True))
    assert routed.info.target == "local" and not a.sent


async def test_an_open_breaker_skips_the_target_until_its_cooldown(ledger, clock):
    a = Scripted("cloud-a", clock, failures=2)
    b = Scripted("cloud-b", clock)
    router = make(ledger, clock, **{"cloud-a": a, "cloud-b": b})
    body = request(model="cloud")
    for _ in range(2):  # two failures open cloud-a's breaker (threshold 2)
        await router.chat(body, features=router.features(body))
    assert router.health_report()["cloud-a"]["status"] == "failing"
    routed = await router.chat(body, features=router.features(body))
    assert len(a.sent) == 2 and routed.info.target == "cloud-b"  # not even tried
    clock.now += 61  # cooldown over: half-open, ranked last; a probe reaches it when cloud-b fails
    assert router.decide(router.features(body)).chain == ["cloud-b", "cloud-a"]
    b.failures = 1
    routed = await router.chat(body, features=router.features(body))
    assert routed.info.target == "cloud-a" and router.health_report()["cloud-a"]["status"] in ("ok", "degraded")
    assert router.health.snapshot()["cloud-a"].breaker == "closed"


async def test_local_cost_is_replica_time_shared_between_concurrent_requests(ledger, clock):
    local = Scripted("local", clock, takes_s=10.0)
    router = make(ledger, clock, local=local)
    body = request()
    routed = await router.chat(body, features=router.features(body))
    assert routed.info.cost_usd == pytest.approx(10.0 * 3.6 / 3600)  # 10 s of a $3.60/h replica
    assert routed.info.cost_usd > 0


def test_replica_share_splits_time_fairly():
    clock = Clock()
    share = ReplicaShare(replicas=1, clock=clock)
    first = share.start()
    clock.now += 4  # alone: 4 s
    second = share.start()
    clock.now += 6  # together: 3 s each
    assert share.stop(first) == pytest.approx(7.0)
    clock.now += 2  # alone again
    assert share.stop(second) == pytest.approx(5.0)
    two = ReplicaShare(replicas=2, clock=clock)
    a, b = two.start(), two.start()
    clock.now += 5  # two replicas: each request has one to itself
    assert two.stop(a) == pytest.approx(5.0) and two.stop(b) == pytest.approx(5.0)


async def test_streams_fail_over_before_the_first_chunk_and_record_spend_before_the_end(ledger, clock):
    a = Scripted("cloud-a", clock, failures=1)
    b = Scripted("cloud-b", clock)
    router = make(ledger, clock, **{"cloud-a": a, "cloud-b": b})
    body = request(model="cloud", stream=True)
    events = []
    async for event in router.stream(body, features=router.features(body), key_id="k1"):
        if "done" in event:
            assert ledger.usage(group_by=("key", "target"))[0]["target"] == "cloud-b"  # already durable
        events.append(event)
    assert events[0]["route"].target == "cloud-b" and events[0]["route"].fallbacks
    words = [e["choices"][0]["delta"]["content"] for e in events[1:-1] if e.get("choices")]
    assert words == ["hi ", "there"] and events[-2]["usage"] == USAGE
    assert events[-1]["done"].cost_usd == pytest.approx((1000 * 3.0 + 500 * 4.0) / 1e6)


async def test_the_ledger_survives_a_restart(tmp_path, clock):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        router = make(ledger, clock, **{"cloud-a": Scripted("cloud-a", clock)})
        body = request(model="cloud")
        await router.chat(body, features=router.features(body), key_id="k")
    with Ledger(path) as reopened:
        assert reopened.spend("k") == pytest.approx(0.002)


def test_targets_without_a_provider_are_reported_not_routed(ledger, clock):
    router = RouterService(CONFIG, {"local": Scripted("local", clock)}, ledger, clock=clock,
                           unavailable={"cloud-a": "environment variable K is not set"})
    report = router.health_report()
    assert report["cloud-a"] == {"status": "unavailable", "detail": "environment variable K is not set"}
    assert report["local"]["status"] == "ok"
    assert router.decide(router.features(request())).chain == ["local"]


async def test_a_client_leaving_mid_stream_is_charged_for_what_it_used_and_frees_its_share(ledger, clock):
    local = Scripted("local", clock, takes_s=2.0)
    router = make(ledger, clock, local=local)
    body = request(stream=True)
    stream = router.stream(body, features=router.features(body), key_id="quitter")
    assert "route" in await anext(stream)
    await anext(stream)  # one chunk, then the client goes away
    await stream.aclose()
    [row] = ledger.usage(group_by=("key", "status"))
    assert row["key"] == "quitter" and row["status"] == "incomplete"
    assert row["cost_usd"] == pytest.approx(2.0 * 3.6 / 3600)  # the replica time it held
    assert not router._shares["local"]._active


async def test_a_cancelled_request_frees_its_replica_share(ledger, clock):
    import asyncio

    class Hanging(Scripted):
        async def _chat_once(self, request):
            await asyncio.sleep(3600)

    router = make(ledger, clock, local=Hanging("local", clock))
    body = request()
    task = asyncio.ensure_future(router.chat(body, features=router.features(body)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not router._shares["local"]._active
