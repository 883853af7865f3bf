"""The routing policy on a table of requests, targets and health states."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from ray_app.router.config import RouterConfig
from ray_app.router.features import extract_features
from ray_app.router.health import HealthSnapshot
from ray_app.router.policy import (
    ContextTooLongError,
    NoHealthyTargetError,
    PrivacyError,
    RoutingError,
    ToolsNotSupportedError,
    UnknownRouteError,
    decide,
)

OPEN = HealthSnapshot(None, 1.0, "open", 10)
HALF_OPEN = HealthSnapshot(1.0, 1.0, "half_open", 10)
FLAKY = HealthSnapshot(1.0, 0.9, "closed", 10)

CONFIG = RouterConfig.parse({
    "targets": [
        {"name": "local-small", "kind": "local", "model": "small", "context_window": 4096, "hourly_rate_usd": 0.5,
         "decode_tokens_per_s": 40, "capabilities": ["chat", "summarize"], "quality": 3},
        {"name": "local-coder", "kind": "local", "model": "coder", "context_window": 8192, "hourly_rate_usd": 2.0,
         "capabilities": ["chat", "code", "tools"], "quality": 6},
        {"name": "cheap-cloud", "kind": "openai", "model": "mini", "api_key_env": "K", "context_window": 16000,
         "price_in_per_mtok": 0.15, "price_out_per_mtok": 0.6,
         "capabilities": ["chat", "summarize", "multilingual", "tools"], "quality": 6},
        {"name": "code-cloud", "kind": "azure", "model": "gpt", "api_key_env": "K", "base_url": "https://x",
         "api_version": "2024-10-21", "context_window": 16000, "price_in_per_mtok": 2.5, "price_out_per_mtok": 10,
         "capabilities": ["chat", "code", "math"], "quality": 8},
        {"name": "long-cloud", "kind": "bedrock", "model": "claude", "region": "us-east-1", "context_window": 100_000,
         "price_in_per_mtok": 1, "price_out_per_mtok": 5, "capabilities": ["chat", "summarize"], "quality": 7},
    ],
    "routes": {
        "auto": {"targets": ["local-small", "local-coder", "cheap-cloud", "code-cloud", "long-cloud"]},
        "private": {"targets": ["local-small", "cheap-cloud"], "allow_cloud": False},
        "best": {"targets": ["cheap-cloud", "code-cloud", "long-cloud", "local-coder"], "prefer": "quality",
                 "min_quality": 7},
        "ordered": {"targets": ["long-cloud", "cheap-cloud"], "prefer": "order"},
    },
})
LOCAL = {t.name for t in CONFIG.targets if t.privacy == "local"}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
LONG_TEXT = "lorem ipsum dolor sit amet " * 7_500  # ~50k tokens: only long-cloud's window fits it


@dataclass
class Case:
    text: str = "What's a good name for a cat?"
    route: str | None = None
    features: dict[str, Any] = field(default_factory=dict)  # extract_features keyword arguments
    health: dict[str, HealthSnapshot] = field(default_factory=dict)
    chain: list[str] | None = None  # expected chain (exactly)
    first: str | None = None  # or just the expected first choice
    error: type[RoutingError] | None = None
    reason: str | None = None  # a substring of one reason (or of the error)
    request: dict[str, Any] = field(default_factory=dict)  # more request fields (tools, ...)


CASES = {
    "simple chat takes the cheapest healthy target": Case(first="cheap-cloud", reason="ranked by balanced"),
    "breaker-open target is skipped": Case(health={"cheap-cloud": OPEN}, first="local-small",
                                           reason="skip cheap-cloud: circuit breaker open"),
    "erroring target is demoted to the back": Case(health={"cheap-cloud": FLAKY}, first="local-small",
                                                   reason="demote cheap-cloud: error rate 0.90"),
    "half-open target is demoted, not skipped": Case(health={"cheap-cloud": HALF_OPEN}, first="local-small",
                                                     reason="half-open"),
    "confidential header keeps it local": Case(features={"headers": {"x-confidential": "1"}},
                                               chain=["local-small", "local-coder"], reason="header"),
    "confidential key keeps it local": Case(features={"confidential_key": True}, chain=["local-small", "local-coder"]),
    "confidential chunk keeps it local": Case(features={"retrieved_sensitivities": ["internal", "confidential"]},
                                              chain=["local-small", "local-coder"], reason="confidential chunk"),
    "PII forces local": Case(text="Email jane.doe@corp.example about her card 4111 1111 1111 1111",
                             chain=["local-small", "local-coder"], reason="PII (card, email)"),
    "confidential with a breaker open uses the other local target only":
        Case(features={"confidential_key": True}, health={"local-small": OPEN}, chain=["local-coder"]),
    "confidential never gets cloud, even when every local target is down":
        Case(features={"headers": {"x-confidential": "yes"}}, health={"local-small": OPEN, "local-coder": OPEN},
             error=PrivacyError, reason="cloud targets are not allowed"),
    "confidential and too long for any local target is an error, not a cloud call":
        Case(text=LONG_TEXT, features={"confidential_key": True}, error=PrivacyError),
    "long context goes to the big-context target": Case(text=LONG_TEXT, chain=["long-cloud"],
                                                        reason="context window 16000"),
    "code goes to a code-capable target, quality first": Case(text="def f(x):\n    return x +\nwhy the syntax error?",
                                                              chain=["code-cloud", "local-coder", "long-cloud"]),
    "confidential code goes to the local coder": Case(text="```python\nimport os\n```", features={"confidential_key": True},
                                                     chain=["local-coder", "local-small"]),
    "math goes to the math-capable target": Case(text="Solve the integral of x^2 dx", first="code-cloud"),
    "non-English goes to a multilingual target": Case(text="Bonjour, pouvez-vous m'aider avec les impôts et les taxes?",
                                                      first="cheap-cloud"),
    "summaries stay cheap": Case(text="Please summarize: the meeting moved to Tuesday.", first="cheap-cloud"),
    "a local-only route never returns cloud": Case(route="private", chain=["local-small"], reason="local-only"),
    "quality route with a floor": Case(route="best", chain=["code-cloud", "long-cloud"],
                                       reason="skip cheap-cloud: quality 6 < route min_quality 7"),
    "ordered route keeps config order": Case(route="ordered", chain=["long-cloud", "cheap-cloud"]),
    "ordered route still skips open breakers": Case(route="ordered", health={"long-cloud": OPEN}, chain=["cheap-cloud"]),
    "every breaker open": Case(route="ordered", health={"long-cloud": OPEN, "cheap-cloud": OPEN},
                               error=NoHealthyTargetError),
    "unknown route": Case(route="fastest", error=UnknownRouteError, reason="'fastest'"),
    "too long for everything": Case(text=LONG_TEXT * 3, error=ContextTooLongError, reason="no target fits"),
    "tools go to targets that take them": Case(request={"tools": [TOOL]}, chain=["cheap-cloud", "local-coder"],
                                              reason="skip local-small: takes no tools"),
    "tools with tool_choice none go anywhere": Case(request={"tools": [TOOL], "tool_choice": "none"},
                                                   first="cheap-cloud", chain=None),
    "a confidential value in a tool result keeps the follow-up local": Case(request={"tools": [TOOL], "messages": [
        {"role": "user", "content": "Look up Jane's payment details."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"who": "Jane"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "card 4111 1111 1111 1111"}]},
        chain=["local-coder"], reason="PII (card)"),
    "tools on a route with no target for them": Case(route="private", request={"tools": [TOOL]},
                                                    error=ToolsNotSupportedError, reason="takes tools"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide(case: Case):
    request = {"messages": [{"role": "user", "content": case.text}], "max_tokens": 100} | case.request
    if case.route:
        request["model"] = case.route
    features = extract_features(request, **case.features)
    if case.error is not None:
        with pytest.raises(case.error) as caught:
            decide(features, CONFIG.targets, case.health, CONFIG)
        if case.reason:
            assert case.reason in str(caught.value)
        return
    decision = decide(features, CONFIG.targets, case.health, CONFIG)
    assert len(decision.chain) <= CONFIG.routes[decision.route].max_chain
    if case.chain is not None:
        assert decision.chain == case.chain, decision.reasons
    if case.first is not None:
        assert decision.chain[0] == case.first, decision.reasons
    if features.local_only:
        assert set(decision.chain) <= LOCAL  # the whole fallback chain, not only the first choice
    if case.reason:
        assert any(case.reason in r for r in decision.reasons), decision.reasons


def test_decide_is_pure_and_ignores_undeployed_targets():
    features = extract_features({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
    deployed = [t for t in CONFIG.targets if t.name != "cheap-cloud"]
    first = decide(features, deployed, {}, CONFIG)
    assert first == decide(features, deployed, {}, CONFIG)
    assert "cheap-cloud" not in first.chain and first.chain[0] == "local-small"


def test_a_route_with_no_deployed_target_is_an_error():
    features = extract_features({"messages": [{"role": "user", "content": "hi"}], "model": "ordered"})
    with pytest.raises(NoHealthyTargetError, match="is deployed"):
        decide(features, [t for t in CONFIG.targets if t.kind == "local"], {}, CONFIG)
