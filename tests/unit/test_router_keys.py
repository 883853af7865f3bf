"""API keys (hashed at rest, never shown twice) and per-key budgets and rate limits."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from ray_app.router.config import KeysConfig
from ray_app.router.keys import AuthError, BudgetExceeded, KeyStore, Quotas, RateLimited
from ray_app.router.ledger import Ledger, LedgerEntry

NOW = datetime(2025, 3, 15, 12, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path):
    return tmp_path / "router" / "ledger.sqlite"


def test_create_authenticate_list_revoke(path):
    store = KeyStore(path)
    new = store.create("alice", budget_usd=5.0, rpm=10, confidential=True)
    assert new.secret.startswith(f"rk-{new.record.key_id}-")
    record = store.authenticate(f"Bearer {new.secret}")
    assert record == new.record and record.confidential
    assert store.authenticate(new.secret) == record
    other = store.create("bob")
    assert [k.name for k in store.list()] == ["alice", "bob"]
    store.revoke(new.record.key_id)
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(new.secret)
    assert store.authenticate(other.secret).name == "bob"
    assert store.get(new.record.key_id).revoked_at is not None
    with pytest.raises(KeyError):
        store.revoke("nope")
    store.close()


@pytest.mark.parametrize("bearer", ["", "Bearer ", "sk-abc", "rk-000000000000-guess", "rk-only"])
def test_bad_tokens_are_refused(path, bearer):
    store = KeyStore(path)
    new = store.create("alice")
    with pytest.raises(AuthError) as caught:
        store.authenticate(bearer)
    assert new.secret not in str(caught.value)
    # Right id, wrong secret.
    with pytest.raises(AuthError):
        store.authenticate(new.secret[:-2] + "xx")


def test_only_a_salted_hash_is_stored_and_keys_survive_reopening(path):
    first = KeyStore(path)
    a, b = first.create("a"), first.create("b")
    first.close()
    rows = sqlite3.connect(path).execute("SELECT * FROM api_keys").fetchall()
    dump = repr(rows)
    for secret in (a.secret, b.secret):
        assert secret not in dump and secret.split("-", 2)[2] not in dump
    salts = sqlite3.connect(path).execute("SELECT salt FROM api_keys").fetchall()
    assert salts[0] != salts[1]
    assert KeyStore(path).authenticate(a.secret).name == "a"


def test_the_secret_never_shows_in_reprs(path):
    store = KeyStore(path)
    new = store.create("alice")
    tail = new.secret.split("-", 2)[2]
    for shown in (repr(new), str(new), repr(new.record), repr(store.list()), new.record.prefix):
        assert tail not in shown
    assert new.record.prefix == f"rk-{new.record.key_id}-..."


def test_budget_is_checked_against_this_period_spend(path):
    clock = Clock()
    ledger = Ledger(path)
    store = KeyStore(path, clock=clock)
    key = store.create("alice", budget_usd=1.0).record
    quotas = Quotas(ledger, KeysConfig(budget_period="month", default_rpm=None, default_tpm=None), clock=clock)

    def spend(usd: float, ts: float) -> None:
        ledger.record(LedgerEntry(key.key_id, "auto", "t", "m", 10, 10, usd, 0.1, "ok", ts=ts))

    spend(5.0, datetime(2025, 2, 28, tzinfo=UTC).timestamp())  # last month's spend does not count
    spend(0.6, NOW - 3600)
    quotas.check(key, tokens=100)
    spend(0.4, NOW - 60)
    with pytest.raises(BudgetExceeded) as caught:
        quotas.check(key, tokens=100)
    assert caught.value.budget_usd == 1.0 and caught.value.spent_usd == pytest.approx(1.0)
    clock.now = datetime(2025, 4, 1, 0, 0, 1, tzinfo=UTC).timestamp()  # a new month
    quotas.check(key, tokens=100)


def test_default_budget_applies_to_keys_without_their_own(path):
    ledger = Ledger(path)
    key = KeyStore(path).create("alice").record
    quotas = Quotas(ledger, KeysConfig(budget_period="day", default_budget_usd=0.5), clock=Clock())
    ledger.record(LedgerEntry(key.key_id, "auto", "t", "m", 1, 1, 0.5, 0.1, "ok", ts=NOW - 60))
    with pytest.raises(BudgetExceeded, match="daily"):
        quotas.check_budget(key)


def test_requests_per_minute_sliding_window(path):
    clock = Clock()
    key = KeyStore(path).create("alice", rpm=2).record
    quotas = Quotas(Ledger(path), KeysConfig(default_tpm=None), clock=clock)
    quotas.admit(key, 1)
    clock.now += 20
    quotas.admit(key, 1)
    clock.now += 10
    with pytest.raises(RateLimited) as caught:
        quotas.admit(key, 1)
    assert caught.value.limit == "rpm"
    assert caught.value.retry_after_s == pytest.approx(30)  # when the first request leaves the window
    clock.now += 30
    quotas.admit(key, 1)


def test_tokens_per_minute_sliding_window(path):
    clock = Clock()
    key = KeyStore(path).create("alice", tpm=1000).record
    quotas = Quotas(Ledger(path), KeysConfig(default_rpm=None), clock=clock)
    quotas.admit(key, 600)
    clock.now += 15
    quotas.admit(key, 300)
    with pytest.raises(RateLimited) as caught:
        quotas.admit(key, 200)
    assert caught.value.limit == "tpm" and caught.value.retry_after_s == pytest.approx(45)
    quotas.settle(key, estimated_tokens=300, actual_tokens=100)  # the request used less than estimated
    quotas.admit(key, 200)
    with pytest.raises(RateLimited, match="more than"):
        quotas.admit(key, 5000)
