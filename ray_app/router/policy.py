"""The routing policy: a pure function from request features, targets and health to a fallback chain.

Hard constraints filter first, in order: the route's own rules, privacy (a confidential or PII-bearing
request may only reach ``privacy: local`` targets, and that holds for every fallback too, so a dead
local model is an error rather than a leak), context-window fit, and open circuit breakers. The
survivors are then ranked: by matching capabilities, by quality when the prompt is complex, then by
estimated cost and latency, with targets that are erroring or half-open moved to the back. Every step
appends a human-readable reason so a decision can be explained in logs and responses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ray_app.router.config import RouterConfig, Target
from ray_app.router.features import RequestFeatures
from ray_app.router.health import HealthSnapshot
from ray_app.accounting.recorder import cloud_cost, local_cost

__all__ = ["ContextTooLongError", "Decision", "NoHealthyTargetError", "OverCostCeilingError", "PrivacyError",
           "RoutingError", "ToolsNotSupportedError",
           "UnknownRouteError", "decide", "estimate_cost", "is_complex"]


class RoutingError(Exception):
    """No target can take the request; ``reasons`` say what was ruled out and why."""

    def __init__(self, message: str, reasons: list[str]):
        self.reasons = reasons
        super().__init__(message + ("\n  " + "\n  ".join(reasons) if reasons else ""))


class UnknownRouteError(RoutingError):
    pass


class PrivacyError(RoutingError):
    """A local-only request has no usable local target; cloud targets are never substituted."""


class ContextTooLongError(RoutingError):
    pass


class NoHealthyTargetError(RoutingError):
    pass


class ToolsNotSupportedError(RoutingError):
    """The request offers tools and no target of its route takes them."""


class OverCostCeilingError(RoutingError):
    """Every candidate could cost more than the caller's per-request ceiling."""


@dataclass(frozen=True)
class Decision:
    route: str
    chain: list[str]  # target names, first choice first
    reasons: list[str]


def estimate_cost(target: Target, features: RequestFeatures) -> float:
    """Upper-bound USD for the request: ``n`` choices of the full ``max_tokens`` each."""
    completion = features.n * features.max_tokens
    if target.kind == "local":
        return local_cost(target.hourly_rate_usd, completion / target.decode_tokens_per_s)
    return cloud_cost(target.price_in_per_mtok, target.price_out_per_mtok, features.prompt_tokens, completion)


def is_complex(features: RequestFeatures, long_prompt_tokens: int) -> bool:
    return features.prompt_tokens >= long_prompt_tokens or bool(features.tasks & {"code", "math"})


def decide(features: RequestFeatures, targets: Sequence[Target], health: Mapping[str, HealthSnapshot],
           config: RouterConfig) -> Decision:
    """The ordered fallback chain for one request, or a ``RoutingError`` saying why there is none.

    ``targets`` are the targets currently deployed (a route's other names are ignored); ``health`` maps
    target names to snapshots (a missing one counts as healthy and unmeasured).
    """
    route_name = features.route or config.default_route
    if route_name not in config.routes:
        raise UnknownRouteError(f"unknown route {route_name!r}", [f"routes: {sorted(config.routes)}"])
    route = config.routes[route_name]
    by_name = {t.name: t for t in targets}
    candidates = [by_name[n] for n in route.targets if n in by_name]
    reasons = [f"route {route_name!r}: candidates {[t.name for t in candidates]}"]
    fresh = HealthSnapshot(None, 0.0, "closed", 0)
    state = {t.name: health.get(t.name, fresh) for t in candidates}

    privacy_why = features.privacy_reasons()
    if not route.allow_cloud:
        privacy_why.append(f"route {route_name!r} is local-only")
    needed_tokens = features.prompt_tokens + features.max_tokens

    def fail(error: type[RoutingError], message: str) -> RoutingError:
        # no target for tools is the request's doing, local-only or not: retrying later cannot help
        if privacy_why and error is not ToolsNotSupportedError:
            return PrivacyError(f"no usable local target for a local-only request ({'; '.join(privacy_why)}); "
                                f"cloud targets are not allowed", reasons)
        return error(message, reasons)

    # Each hard rule says why a target is out (None: it stays), and which error to raise if none is left.
    def below_min_quality(t: Target) -> str | None:
        if route.min_quality is not None and t.quality < route.min_quality:
            return f"quality {t.quality} < route min_quality {route.min_quality}"
        return None

    def leaves_the_premises(t: Target) -> str | None:
        return "cloud target, request is local-only" if privacy_why and t.privacy != "local" else None

    def too_small(t: Target) -> str | None:
        if t.context_window < needed_tokens:
            return f"context window {t.context_window} < ~{needed_tokens} tokens needed"
        return None

    def takes_no_tools(t: Target) -> str | None:
        return "takes no tools (no `tools` in its capabilities)" if features.tools and "tools" not in t.capabilities else None

    def breaker_open(t: Target) -> str | None:
        return "circuit breaker open" if state[t.name].breaker == "open" else None

    def over_ceiling(t: Target) -> str | None:
        ceiling = features.max_request_usd
        if ceiling is not None and (cost := estimate_cost(t, features)) > ceiling:
            return f"may cost ~${cost:.5f}, over the caller's ${ceiling:.5f} per-request ceiling"
        return None

    no_fit = (f"no target fits ~{needed_tokens} tokens "
              f"(prompt ~{features.prompt_tokens} + max_tokens {features.max_tokens})")
    hard_rules: list[tuple[Callable[[Target], str | None], type[RoutingError], str]] = [
        (below_min_quality, RoutingError, f"no target on route {route_name!r} meets its min_quality"),
        (leaves_the_premises, PrivacyError, "no local target"),
        (too_small, ContextTooLongError, no_fit),
        (takes_no_tools, ToolsNotSupportedError, f"no target on route {route_name!r} takes tools"),
        (over_ceiling, OverCostCeilingError, "every candidate may cost more than the caller's per-request ceiling"),
        (breaker_open, NoHealthyTargetError, "every candidate's circuit breaker is open"),
    ]
    if privacy_why:
        reasons.append(f"privacy: local targets only ({'; '.join(privacy_why)})")
    if not candidates:
        raise fail(NoHealthyTargetError, f"none of route {route_name!r}'s targets is deployed")
    for rule, error, message in hard_rules:
        kept = []
        for t in candidates:
            why = rule(t)
            if why is None:
                kept.append(t)
            else:
                reasons.append(f"skip {t.name}: {why}")
        if not kept:
            raise fail(error, message)
        candidates = kept

    needed = features.tasks or frozenset({"chat"})
    complex_prompt = is_complex(features, config.policy.long_prompt_tokens)
    reasons.append(f"task: {', '.join(sorted(needed))}; {'complex' if complex_prompt else 'simple'} prompt "
                   f"(~{features.prompt_tokens} tokens)")
    costs = {t.name: estimate_cost(t, features) for t in candidates}
    order = {t.name: i for i, t in enumerate(candidates)}

    def degraded(t: Target) -> bool:
        s = state[t.name]
        return s.breaker == "half_open" or s.error_rate > config.policy.max_error_rate

    def key(t: Target) -> tuple:
        match = -len(needed & set(t.capabilities))
        latency = state[t.name].latency_ewma_s or 0.0  # unmeasured targets get a fair chance
        return {
            "balanced": (degraded(t), match, -t.quality if complex_prompt else 0, costs[t.name], latency,
                         order[t.name]),
            "cost": (degraded(t), costs[t.name], match, latency, order[t.name]),
            "quality": (degraded(t), -t.quality, match, costs[t.name], order[t.name]),
            "order": (degraded(t), order[t.name]),
        }[route.prefer]

    ranked = sorted(candidates, key=key)
    for t in ranked:
        if degraded(t):
            s = state[t.name]
            reasons.append(f"demote {t.name}: " + ("breaker half-open (probing)" if s.breaker == "half_open"
                                                  else f"error rate {s.error_rate:.2f}"))
    chain = ranked[:route.max_chain]
    reasons.append(f"ranked by {route.prefer}: " + ", ".join(
        f"{t.name} (caps {len(needed & set(t.capabilities))}/{len(needed)}, quality {t.quality}, "
        f"~${costs[t.name]:.5f})"
        for t in chain))
    return Decision(route_name, [t.name for t in chain], reasons)
