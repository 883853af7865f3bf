"""The router at work: one chat request -> a decision -> the fallback chain tried in order -> spend.

``RouterService`` is a plain class (the Serve ``Router`` deployment only hosts it). For each request it
extracts features, asks the pure policy for a chain, then tries the chain's targets in order: a target
whose breaker refuses is skipped, a failure is recorded in the target's health and the next target is
tried, and a client error (HTTP 4xx other than 408/429) is returned at once, since another model would
refuse the same request. The chain never contains a cloud target for a local-only request, so a
fallback cannot leak one. Every request ends as one ledger row, written before the answer (or the
stream's last event) is handed back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_app.metrics import record_route
from ray_app.router.config import RouterConfig, Target
from ray_app.router.features import RequestFeatures, extract_features
from ray_app.router.health import HealthBoard
from ray_app.router.ledger import Ledger, LedgerEntry, cloud_cost, local_cost
from ray_app.router.policy import Decision, decide
from ray_app.router.providers import Provider, ProviderError

__all__ = ["AllTargetsFailed", "ReplicaShare", "RouteInfo", "Routed", "RouterService"]

logger = logging.getLogger("ray_app.router")


class AllTargetsFailed(Exception):
    """Every target of the chain failed or was refused by its breaker; ``failures`` say how."""

    def __init__(self, route: str, failures: list[str]):
        self.route, self.failures = route, failures
        super().__init__(f"route {route!r}: every target failed: " + "; ".join(failures))


class ReplicaShare:
    """Replica seconds used by each in-flight request of a local target, shared fairly.

    With ``n`` requests in flight on ``replicas`` replicas, each request is charged
    ``dt * min(1, replicas / n)`` for every interval ``dt``: a replica batching eight requests costs
    each of them an eighth of its time, and the shares of a request add up to what it really used.
    """

    def __init__(self, replicas: int = 1, clock: Callable[[], float] = time.monotonic):
        self.replicas = replicas
        self._clock = clock
        self._active: dict[int, float] = {}
        self._ids = itertools.count()
        self._last = clock()

    def _advance(self) -> None:
        now = self._clock()
        if self._active:
            share = (now - self._last) * min(1.0, self.replicas / len(self._active))
            for token in self._active:
                self._active[token] += share
        self._last = now

    def start(self) -> int:
        self._advance()
        token = next(self._ids)
        self._active[token] = 0.0
        return token

    def stop(self, token: int) -> float:
        self._advance()
        return self._active.pop(token)


@dataclass
class RouteInfo:
    """What the response headers report: where the request went, why, and what it cost."""

    route: str
    target: str
    model: str
    reasons: list[str]
    fallbacks: list[str] = field(default_factory=list)  # "target: why it failed", in order tried
    cost_usd: float | None = None
    usage: dict[str, Any] | None = None  # the target's token counts, once known

    def headers(self) -> dict[str, str]:
        reason = "; ".join([f"fallback after {f}" for f in self.fallbacks] + self.reasons)
        headers = {"x-ray-app-route": f"{self.route}/{self.target}",
                   # HTTP header values are one line of Latin-1; a long explanation is cut, the log has it all
                   "x-ray-app-reason": reason.encode("ascii", "replace").decode()[:1024].replace("\n", " ")}
        if self.cost_usd is not None:
            headers["x-ray-app-cost-usd"] = f"{self.cost_usd:.8f}"
        return headers


@dataclass
class Routed:
    info: RouteInfo
    body: dict[str, Any]


class RouterService:
    """Routes chat requests over the configured targets that are deployed (have a provider)."""

    def __init__(self, config: RouterConfig, providers: Mapping[str, Provider], ledger: Ledger, *,
                 replicas: Mapping[str, int] | None = None, unavailable: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.providers = dict(providers)
        self.ledger = ledger
        self.unavailable = dict(unavailable or {})  # target -> why it is not deployed (no credentials, ...)
        self.targets = [t for t in config.targets if t.name in self.providers]
        self.health = HealthBoard(self.providers, config.policy.ewma_alpha, config.policy.breaker, clock)
        self._clock = clock
        self._shares = {t.name: ReplicaShare((replicas or {}).get(t.name, 1), clock)
                        for t in self.targets if t.kind == "local"}

    # -- deciding ------------------------------------------------------------------------------

    @property
    def routes(self) -> list[str]:
        return sorted(self.config.routes)

    def features(self, request: Mapping[str, Any], headers: Mapping[str, str] | None = None,
                 confidential_key: bool = False, retrieved_sensitivities: Iterable[str] = ()) -> RequestFeatures:
        return extract_features(request, headers=headers, confidential_key=confidential_key,
                                retrieved_sensitivities=retrieved_sensitivities,
                                default_max_tokens=self.config.policy.default_max_tokens,
                                chars_per_token=self.config.policy.chars_per_token)

    def decide(self, features: RequestFeatures) -> Decision:
        """The chain for a request, or a ``RoutingError`` (unknown route, privacy, context, breakers)."""
        decision = decide(features, self.targets, self.health.snapshot(), self.config)
        # the reasons, never the prompt: they name PII kinds and rules, not values
        logger.info("route %s -> %s: %s", decision.route, " > ".join(decision.chain), " | ".join(decision.reasons))
        return decision

    # -- calling -------------------------------------------------------------------------------

    def _cost(self, target: Target, usage: Mapping[str, Any] | None, replica_s: float) -> float:
        if target.kind == "local":
            return local_cost(target, replica_s)
        usage = usage or {}
        return cloud_cost(target, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))

    async def _record(self, key_id: str | None, info: RouteInfo, usage: Mapping[str, Any] | None, cost: float,
                      started: float, status: str) -> None:
        usage = usage or {}
        record_route(info.route, info.target, status, cost)
        # durable (fsync) before the caller answers, without stalling the other requests on this loop
        await asyncio.to_thread(self.ledger.record, LedgerEntry(
            key_id=key_id, route=info.route, target=info.target, model=info.model,
            prompt_tokens=int(usage.get("prompt_tokens", 0)), completion_tokens=int(usage.get("completion_tokens", 0)),
            cost_usd=cost, latency_s=self._clock() - started, status=status))

    def _attempts(self, decision: Decision, failures: list[str]) -> Iterable[Target]:
        """The chain's targets whose breakers admit a request now."""
        for name in decision.chain:
            if self.health[name].allow_request():
                yield self.config.target(name)
            else:
                failures.append(f"{name}: circuit breaker open")

    def _failed(self, target: Target, error: ProviderError, failures: list[str]) -> None:
        self.health[target.name].record(False)
        failures.append(f"{target.name}: {error}")
        logger.warning("target %s failed: %s", target.name, error)
        if _client_error(error):
            raise error  # the request itself is bad; another model would refuse it too

    async def chat(self, request: dict[str, Any], *, features: RequestFeatures,
                   key_id: str | None = None) -> Routed:
        decision = self.decide(features)
        started, failures = self._clock(), []
        for target in self._attempts(decision, failures):
            share = self._shares[target.name].start() if target.kind == "local" else None
            attempt_started = self._clock()
            try:
                body = await self.providers[target.name].chat(request)
            except BaseException as e:  # a cancelled request (client gone) must release its share too
                if share is not None:
                    self._shares[target.name].stop(share)
                if not isinstance(e, ProviderError):
                    raise
                self._failed(target, e, failures)
                continue
            replica_s = self._shares[target.name].stop(share) if share is not None else 0.0
            self.health[target.name].record(True, self._clock() - attempt_started)
            info = RouteInfo(decision.route, target.name, target.model, decision.reasons, failures)
            info.cost_usd, info.usage = self._cost(target, body.get("usage"), replica_s), body.get("usage")
            await self._record(key_id, info, body.get("usage"), info.cost_usd, started, "ok")
            return Routed(info, body)
        await self._record_failure(key_id, decision, started)
        raise AllTargetsFailed(decision.route, failures)

    async def stream(self, request: dict[str, Any], *, features: RequestFeatures,
                     key_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """``{"route": RouteInfo}`` once a target has produced its first chunk, then the chunks (a
        ``chat.completion.chunk`` dict each, the last one with ``usage``), then ``{"done": RouteInfo}``
        with the cost. A stream is only failed over before its first chunk."""
        decision = self.decide(features)
        started, failures = self._clock(), []
        for target in self._attempts(decision, failures):
            share = self._shares[target.name].start() if target.kind == "local" else None
            attempt_started = self._clock()
            chunks = self.providers[target.name].stream(request)
            usage: dict[str, Any] | None = None
            info: RouteInfo | None = None
            charged = False
            status = "incomplete"  # until the stream ends: the client may go away first
            try:
                try:
                    first = await anext(chunks)
                except (ProviderError, StopAsyncIteration) as e:
                    error = e if isinstance(e, ProviderError) else ProviderError(target.name, "empty stream")
                    self._failed(target, error, failures)
                    continue
                info = RouteInfo(decision.route, target.name, target.model, decision.reasons, failures)
                yield {"route": info}
                chunk = first
                try:
                    while True:
                        usage = chunk.get("usage") or usage
                        yield chunk
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    status = "ok"
                    self.health[target.name].record(True, self._clock() - attempt_started)
                except ProviderError as e:  # mid-stream: the client has output already, so no failover
                    status = "upstream_error"
                    self.health[target.name].record(False)
                    yield {"error": {"message": str(e), "status": e.status or 502}}
                charged = True
                await self._charge(key_id, info, target, usage, share, started, status)
                yield {"done": info}
                return
            finally:
                await chunks.aclose()
                if not charged:
                    if info is not None:  # the client left mid-stream: what was used is still charged
                        charged = True
                        await self._charge(key_id, info, target, usage, share, started, status)
                    elif share is not None:  # the target failed before its first chunk
                        self._shares[target.name].stop(share)
        await self._record_failure(key_id, decision, started)
        raise AllTargetsFailed(decision.route, failures)

    async def _charge(self, key_id: str | None, info: RouteInfo, target: Target, usage: dict[str, Any] | None,
                      share: int | None, started: float, status: str) -> None:
        replica_s = self._shares[target.name].stop(share) if share is not None else 0.0
        info.cost_usd, info.usage = self._cost(target, usage, replica_s), usage
        await self._record(key_id, info, usage, info.cost_usd, started, status)

    async def _record_failure(self, key_id: str | None, decision: Decision, started: float) -> None:
        info = RouteInfo(decision.route, "-", "-", decision.reasons)
        await self._record(key_id, info, None, 0.0, started, "upstream_error")

    # -- reporting -----------------------------------------------------------------------------

    def health_report(self) -> dict[str, dict[str, Any]]:
        """Per target: deployed or why not, breaker state, error rate, latency EWMA."""
        report: dict[str, dict[str, Any]] = {
            name: {"status": "unavailable", "detail": why} for name, why in self.unavailable.items()}
        for name, s in self.health.snapshot().items():
            status = {"closed": "ok", "half_open": "probing", "open": "failing"}[s.breaker]
            if status == "ok" and s.error_rate > self.config.policy.max_error_rate:
                status = "degraded"
            report[name] = {"status": status, "error_rate": round(s.error_rate, 3), "requests": s.requests,
                            "latency_ewma_s": None if s.latency_ewma_s is None else round(s.latency_ewma_s, 4)}
        return report


def _client_error(error: ProviderError) -> bool:
    return error.status is not None and 400 <= error.status < 500 and error.status not in (408, 429)
