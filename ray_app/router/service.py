"""The router in the gateway: request features, the policy's decision, and each target's health.

``RouterService`` is a plain class the gateway holds. Per routed request it extracts features (the
PII scan reads every string the request would send), asks the pure policy (``policy.decide``) for a
fallback chain over the targets that are deployed, and keeps the latency and error EWMAs and circuit
breakers that the next decision reads. Calling the targets is the dispatcher's job
(``ray_app.serve.dispatch``): local targets through their LLM deployments, cloud targets through the
``Router`` deployment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ray_app.router.config import RouterConfig, Target
from ray_app.router.features import RequestFeatures, extract_features
from ray_app.router.health import HealthBoard
from ray_app.router.policy import Decision, decide

__all__ = ["RouterService"]

logger = logging.getLogger("ray_app.router")


class RouterService:
    """Decides over the configured targets that are deployed: every local one, and the cloud ones the
    ``Router`` deployment has credentials for (``set_deployed``)."""

    def __init__(self, config: RouterConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.health = HealthBoard([t.name for t in config.targets], config.policy.ewma_alpha, config.policy.breaker,
                                  clock)
        self.unavailable: dict[str, str] = {}
        self._deployed = [t for t in config.targets if t.kind == "local"]

    def set_deployed(self, cloud: Mapping[str, str | None]) -> None:
        """What the Router deployment reported: cloud target -> None (deployed) or why not."""
        self.unavailable = {name: why for name, why in cloud.items() if why is not None}
        self._deployed = [t for t in self.config.targets
                          if t.kind == "local" or (t.name in cloud and cloud[t.name] is None)]

    @property
    def targets(self) -> list[Target]:
        return list(self._deployed)

    @property
    def routes(self) -> list[str]:
        return sorted(self.config.routes)

    def features(self, request: Mapping[str, Any], headers: Mapping[str, str] | None = None,
                 confidential_key: bool = False, retrieved_sensitivities: Iterable[str] = (),
                 max_request_usd: float | None = None) -> RequestFeatures:
        return extract_features(request, headers=headers, confidential_key=confidential_key,
                                retrieved_sensitivities=retrieved_sensitivities,
                                default_max_tokens=self.config.policy.default_max_tokens,
                                chars_per_token=self.config.policy.chars_per_token, max_request_usd=max_request_usd)

    def decide(self, features: RequestFeatures) -> Decision:
        """The chain for a request, or a ``RoutingError`` (unknown route, privacy, context, breakers)."""
        decision = decide(features, self._deployed, self.health.snapshot(), self.config)
        # the reasons, never the prompt: they name PII kinds and rules, not values
        logger.info("route %s -> %s: %s", decision.route, " > ".join(decision.chain), " | ".join(decision.reasons))
        return decision

    def health_report(self) -> dict[str, dict[str, Any]]:
        """Per target: deployed or why not, breaker state, error rate, latency EWMA."""
        report: dict[str, dict[str, Any]] = {
            name: {"status": "unavailable", "detail": why} for name, why in self.unavailable.items()}
        deployed = {t.name for t in self._deployed}
        for name, s in self.health.snapshot().items():
            if name not in deployed:
                report.setdefault(name, {"status": "unavailable", "detail": "not reported by the Router deployment"})
                continue
            status = {"closed": "ok", "half_open": "probing", "open": "failing"}[s.breaker]
            if status == "ok" and s.error_rate > self.config.policy.max_error_rate:
                status = "degraded"
            report[name] = {"status": status, "error_rate": round(s.error_rate, 3), "requests": s.requests,
                            "latency_ewma_s": None if s.latency_ewma_s is None else round(s.latency_ewma_s, 4)}
        return report
