"""Recording metrics never fails the work it measures, zero counts included (Ray's Counter refuses 0)."""

from __future__ import annotations

import pytest

from ray_app import metrics


@pytest.fixture
def in_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)


def test_zero_counts_are_recorded_without_error(in_ray):
    metrics.record_request("all-minilm-l6-v2", "embeddings", 12, 0, 0.01, None)  # embeddings produce no tokens
    metrics.record_request("tiny-llama", "chat", 0, 5, 0.2, 0.05)
    metrics.record_ingest("handbook", "failed", 0)
    metrics.record_error(400, None)
    metrics.record_train_step("run", 0, 2.5, 0.0)
    metrics.record_spend("auto", "-", "upstream_error", 0.0)  # a failed request costs nothing
    metrics.record_spend("auto", "local-small", "ok", 1.2e-5)


def test_outside_ray_recording_is_a_no_op(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the e2e session's Ray may be up
    assert metrics._get("requests") is None
    metrics.record_request("m", "chat", 0, 0, 0.0, None)
