"""The spend ledger on a real SQLite file, and the cost functions."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from ray_app.router.config import Target
from ray_app.router.ledger import Ledger, LedgerEntry, cloud_cost, local_cost

DAY1 = datetime(2025, 3, 1, 12, tzinfo=UTC).timestamp()
DAY2 = datetime(2025, 3, 2, 12, tzinfo=UTC).timestamp()


def _entry(key: str | None, model: str, cost: float, ts: float, prompt: int = 10, completion: int = 5,
           status: str = "ok") -> LedgerEntry:
    return LedgerEntry(key_id=key, route="auto", target=f"t-{model}", model=model, prompt_tokens=prompt,
                       completion_tokens=completion, cost_usd=cost, latency_s=0.5, status=status, ts=ts)


def test_records_survive_reopening(tmp_path):
    path = tmp_path / "router" / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.record(_entry("k1", "gpt", 0.01, DAY1))
        ledger.record(_entry("k1", "gpt", 0.02, DAY1 + 60))
        ledger.record(_entry("k1", "haiku", 0.03, DAY2))
        ledger.record(_entry("k2", "gpt", 0.5, DAY2))
    with Ledger(path) as ledger:
        rows = ledger.usage()
        assert [(r["key"], r["model"], r["day"], r["requests"]) for r in rows] == [
            ("k1", "gpt", "2025-03-01", 2), ("k1", "haiku", "2025-03-02", 1), ("k2", "gpt", "2025-03-02", 1)]
        assert rows[0]["cost_usd"] == pytest.approx(0.03)
        assert rows[0]["prompt_tokens"] == 20 and rows[0]["completion_tokens"] == 10
        assert ledger.spend("k1") == pytest.approx(0.06)
        assert ledger.spend("k1", since=DAY2 - 3600) == pytest.approx(0.03)


def test_record_is_committed_before_it_returns(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.record(_entry("k", "gpt", 0.01, DAY1))
    # A second, independent connection sees the row while the ledger is still open.
    other = sqlite3.connect(tmp_path / "ledger.sqlite")
    assert other.execute("SELECT COUNT(*) FROM spend").fetchone() == (1,)
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()
    ledger.close()


def test_usage_filters_and_groupings(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        assert ledger.usage() == []
        ledger.record(_entry("k1", "gpt", 0.01, DAY1))
        ledger.record(_entry("k2", "gpt", 0.02, DAY2, status="upstream_error"))
        ledger.record(_entry(None, "haiku", 0.04, DAY2))
        assert [(r["model"], r["requests"]) for r in ledger.usage(group_by=("model",))] == [("gpt", 2), ("haiku", 1)]
        assert [r["status"] for r in ledger.usage(group_by=("status",))] == ["ok", "upstream_error"]
        assert ledger.usage(key_id="k2", group_by=())[0]["cost_usd"] == pytest.approx(0.02)
        assert ledger.usage(since=DAY2 - 1, group_by=())[0]["requests"] == 2
        assert ledger.usage(key_id="nobody", group_by=()) == []
        with pytest.raises(ValueError, match="unknown"):
            ledger.usage(group_by=("colour",))


def _target(**extra) -> Target:
    return Target(name="t", model="m", context_window=1000, **extra)


def test_cloud_cost():
    target = _target(kind="openai", api_key_env="K", price_in_per_mtok=2.5, price_out_per_mtok=10)
    assert cloud_cost(target, 1_000_000, 0) == pytest.approx(2.5)
    assert cloud_cost(target, 1000, 500) == pytest.approx(0.0025 + 0.005)


def test_local_cost_is_replica_time_at_the_hourly_rate():
    target = _target(kind="local", hourly_rate_usd=3.6)
    assert local_cost(target, 10) == pytest.approx(0.01)
    unpriced = target.model_copy(update={"hourly_rate_usd": None})  # only possible by bypassing validation
    with pytest.raises(ValueError, match="hourly_rate_usd"):
        local_cost(unpriced, 10)
