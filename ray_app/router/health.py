"""Per-target health: latency and error-rate EWMAs and a circuit breaker.

The policy reads immutable ``HealthSnapshot``s, so routing stays a pure function; the caller that
sends requests records outcomes here and asks ``allow_request`` right before each attempt, which is
where a half-open breaker admits its single probe. The clock is injectable so tests step time instead
of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from ray_app.router.config import BreakerConfig

__all__ = ["BreakerState", "CircuitBreaker", "HealthBoard", "HealthSnapshot", "TargetHealth"]

BreakerState = Literal["closed", "open", "half_open"]
Clock = Callable[[], float]


class CircuitBreaker:
    """closed -> (``failure_threshold`` consecutive failures) -> open -> (``cooldown_s``) -> half_open.

    Half-open admits one probe at a time: its success closes the breaker, its failure reopens it for
    another cooldown.
    """

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Clock = time.monotonic):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_started: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow_request(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        # A probe whose outcome never came back (a cancelled request) must not wedge the breaker.
        now = self._clock()
        if state == "half_open" and (self._probe_started is None or now - self._probe_started >= self.cooldown_s):
            self._probe_started = now
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probe_started = None

    def record_failure(self) -> None:
        self._failures += 1
        if self.state == "half_open" or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
        self._probe_started = None


@dataclass(frozen=True)
class HealthSnapshot:
    latency_ewma_s: float | None
    error_rate: float
    breaker: BreakerState
    requests: int


class TargetHealth:
    """What one target's recent requests say about it."""

    def __init__(self, alpha: float, breaker: CircuitBreaker):
        self.alpha = alpha
        self.breaker = breaker
        self.latency_ewma_s: float | None = None
        self.error_rate = 0.0
        self.requests = 0

    def record(self, ok: bool, latency_s: float | None = None) -> None:
        self.requests += 1
        self.error_rate += self.alpha * ((0.0 if ok else 1.0) - self.error_rate)
        # A failure's latency (often a timeout) says little about how fast the target answers.
        if ok and latency_s is not None:
            self.latency_ewma_s = (latency_s if self.latency_ewma_s is None
                                   else self.latency_ewma_s + self.alpha * (latency_s - self.latency_ewma_s))
        if ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()

    def allow_request(self) -> bool:
        return self.breaker.allow_request()

    def snapshot(self) -> HealthSnapshot:
        return HealthSnapshot(self.latency_ewma_s, self.error_rate, self.breaker.state, self.requests)


class HealthBoard:
    """The ``TargetHealth`` of every target, created from the policy's EWMA and breaker settings."""

    def __init__(self, target_names: Iterable[str], alpha: float, breaker: BreakerConfig,
                 clock: Clock = time.monotonic):
        self._targets = {
            name: TargetHealth(alpha, CircuitBreaker(breaker.failure_threshold, breaker.cooldown_s, clock))
            for name in target_names}

    def __getitem__(self, name: str) -> TargetHealth:
        return self._targets[name]

    def snapshot(self) -> dict[str, HealthSnapshot]:
        return {name: health.snapshot() for name, health in self._targets.items()}
