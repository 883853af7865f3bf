"""Target health: EWMAs and the circuit breaker, on a clock the test steps by hand."""

from __future__ import annotations

import pytest

from ray_app.router.config import BreakerConfig
from ray_app.router.health import CircuitBreaker, HealthBoard, TargetHealth


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_half_opens_after_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow_request()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow_request()
    clock.now += 29.9
    assert breaker.state == "open"
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.allow_request()  # the single probe
    assert not breaker.allow_request()  # a second caller waits for the probe's outcome
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow_request()


def test_failed_probe_reopens_for_a_full_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow_request()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 9
    assert breaker.state == "open"
    clock.now += 1
    assert breaker.state == "half_open"


def test_a_lost_probe_does_not_wedge_the_breaker():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow_request()  # its outcome is never recorded (the request was cancelled)
    clock.now += 10
    assert breaker.allow_request()


def test_success_resets_the_consecutive_failure_count():
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_ewmas():
    health = TargetHealth(alpha=0.5, breaker=CircuitBreaker(5, 10, Clock()))
    assert health.snapshot().latency_ewma_s is None
    health.record(True, 2.0)
    assert health.latency_ewma_s == 2.0
    health.record(True, 4.0)
    assert health.latency_ewma_s == pytest.approx(3.0)
    health.record(False, 100.0)  # a failure's latency is not a speed measurement
    assert health.latency_ewma_s == pytest.approx(3.0)
    assert health.error_rate == pytest.approx(0.5)
    health.record(False)
    assert health.error_rate == pytest.approx(0.75)
    snapshot = health.snapshot()
    assert (snapshot.requests, snapshot.breaker) == (4, "closed")


def test_board_uses_the_policy_settings():
    clock = Clock()
    board = HealthBoard(["a", "b"], alpha=0.2, breaker=BreakerConfig(failure_threshold=1, cooldown_s=5), clock=clock)
    board["a"].record(False)
    snapshot = board.snapshot()
    assert snapshot["a"].breaker == "open" and snapshot["b"].breaker == "closed"
    assert snapshot["a"].error_rate == pytest.approx(0.2)
    clock.now += 5
    assert board.snapshot()["a"].breaker == "half_open"
