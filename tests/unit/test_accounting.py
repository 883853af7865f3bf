"""Keys (hashed at rest, scoped), rate windows, the ledger, budget reservations and the spend recorder,
on real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime

import pytest

from ray_app.accounting.config import AuthConfig
from ray_app.accounting.keys import AuthError, KeyStore, Scopes
from ray_app.accounting.ledger import BudgetExceeded, Ledger, LedgerEntry
from ray_app.accounting.limits import RateLimited, RateWindows
from ray_app.accounting.recorder import (
    CloudPrice,
    CostCeilingExceeded,
    Outcome,
    ReplicaShare,
    SpendRecorder,
    cloud_cost,
    local_cost,
)

NOW = datetime(2025, 3, 15, 12, tzinfo=UTC).timestamp()
DAY1 = datetime(2025, 3, 1, 12, tzinfo=UTC).timestamp()
DAY2 = datetime(2025, 3, 2, 12, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path):
    return tmp_path / "router" / "ledger.sqlite"


# -- keys -----------------------------------------------------------------------------------------


def test_create_authenticate_list_revoke(path):
    store = KeyStore(path)
    new = store.create("alice", budget_usd=5.0, rpm=10, confidential=True,
                       scopes=Scopes(write=("hr",), clearance="confidential"), max_tokens=100, max_n=2,
                       max_request_usd=0.5, capture=True)
    assert new.secret.startswith(f"rk-{new.record.key_id}-")
    record = store.authenticate(f"Bearer {new.secret}")
    assert record == new.record and record.confidential and record.capture
    assert (record.max_tokens, record.max_n, record.max_request_usd) == (100, 2, 0.5)
    assert record.scopes.can_write("hr") and not record.scopes.can_write("legal") and record.scopes.can_read("legal")
    assert store.authenticate(new.secret) == record
    other = store.create("bob")
    assert other.record.scopes == Scopes()  # read everything, write nothing, clearance internal, not admin
    assert [k.name for k in store.list()] == ["alice", "bob"] and store.active() == 2
    store.revoke(new.record.key_id)
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(new.secret)
    assert store.authenticate(other.secret).name == "bob" and store.active() == 1
    assert store.get(new.record.key_id).revoked_at is not None
    with pytest.raises(KeyError):
        store.revoke("nope")
    store.close()


def test_scopes():
    reader = Scopes(read=("docs",))
    assert reader.can_read("docs") and not reader.can_read("hr") and not reader.can_write("docs")
    assert reader.labels == ["public", "internal"]
    assert Scopes(clearance="public").labels == ["public"]
    admin = Scopes(admin=True, read=())
    assert admin.can_read("x") and admin.can_write("x")
    assert Scopes.from_json(Scopes(write=("*",)).to_json()).can_write("anything")
    with pytest.raises(ValueError, match="clearance"):
        Scopes(clearance="secret")


def test_a_ledger_written_before_scopes_existed_keeps_its_keys(path):
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.execute("""CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL,
                   hash BLOB NOT NULL, created_at REAL NOT NULL, revoked_at REAL, budget_usd REAL, rpm INTEGER,
                   tpm INTEGER, confidential INTEGER NOT NULL DEFAULT 0)""")
    old.execute("INSERT INTO api_keys VALUES ('abc', 'old', x'00', x'00', 1.0, NULL, 2.5, 7, NULL, 1)")
    old.commit()
    old.close()
    [record] = KeyStore(path).list()
    assert (record.name, record.budget_usd, record.rpm, record.confidential) == ("old", 2.5, 7, True)
    assert record.scopes == Scopes()


@pytest.mark.parametrize("bearer", ["", "Bearer ", "sk-abc", "rk-000000000000-guess", "rk-only"])
def test_bad_tokens_are_refused(path, bearer):
    store = KeyStore(path)
    new = store.create("alice")
    with pytest.raises(AuthError) as caught:
        store.authenticate(bearer)
    assert new.secret not in str(caught.value)
    with pytest.raises(AuthError):  # right id, wrong secret
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


# -- rate windows ---------------------------------------------------------------------------------


def test_requests_per_minute_sliding_window(path):
    clock = Clock()
    key = KeyStore(path).create("alice", rpm=2).record
    windows = RateWindows(None, None, clock)
    windows.admit(key, 1)
    clock.now += 20
    windows.admit(key, 1)
    clock.now += 10
    with pytest.raises(RateLimited) as caught:
        windows.admit(key, 1)
    assert caught.value.limit == "rpm"
    assert caught.value.retry_after_s == pytest.approx(30)  # when the first request leaves the window
    clock.now += 30
    windows.admit(key, 1)


def test_tokens_per_minute_sliding_window(path):
    clock = Clock()
    key = KeyStore(path).create("alice", tpm=1000).record
    windows = RateWindows(None, None, clock)
    windows.admit(key, 600)
    clock.now += 15
    windows.admit(key, 300)
    with pytest.raises(RateLimited) as caught:
        windows.admit(key, 200)
    assert caught.value.limit == "tpm" and caught.value.retry_after_s == pytest.approx(45)
    windows.settle(key.key_id, estimated_tokens=300, actual_tokens=100)  # the request used less than estimated
    windows.admit(key, 200)
    with pytest.raises(RateLimited, match="more than"):
        windows.admit(key, 5000)


def test_windows_are_safe_under_threads(path):
    # admission runs in worker threads while settlement runs on the event loop: no "deque mutated"
    key = KeyStore(path).create("alice", rpm=10**9, tpm=10**12).record
    windows = RateWindows(None, None)
    errors: list[Exception] = []

    def hammer() -> None:
        try:
            for _ in range(2000):
                windows.admit(key, 3)
                windows.settle(key.key_id, 3, 2)
        except Exception as e:  # pragma: no cover - what the lock prevents
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- the ledger -----------------------------------------------------------------------------------


def _entry(key: str | None, model: str, cost: float, ts: float, prompt: int = 10, completion: int = 5,
           status: str = "ok") -> LedgerEntry:
    return LedgerEntry(key_id=key, route="auto", target=f"t-{model}", model=model, prompt_tokens=prompt,
                       completion_tokens=completion, cost_usd=cost, latency_s=0.5, status=status, ts=ts)


def test_records_survive_reopening(path):
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


def test_record_is_committed_before_it_returns(path):
    ledger = Ledger(path)
    ledger.record(_entry("k", "gpt", 0.01, DAY1))
    # A second, independent connection sees the row while the ledger is still open.
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM spend").fetchone() == (1,)
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()
    ledger.close()


def test_usage_filters_and_groupings(path):
    with Ledger(path) as ledger:
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


def test_reservations_hold_budget_until_settled_or_expired(path):
    clock = Clock()
    ledger = Ledger(path, clock=clock)
    since = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    ledger.record(_entry("k", "gpt", 0.5, NOW - 60))
    ledger.record(_entry("k", "gpt", 9.0, datetime(2025, 2, 28, tzinfo=UTC).timestamp()))  # last month: free
    first = ledger.reserve("k", 0.3, 1.0, since, ttl_s=60)
    with pytest.raises(BudgetExceeded) as caught:
        ledger.reserve("k", 0.3, 1.0, since, ttl_s=60)  # 0.5 spent + 0.3 held + 0.3 > 1.0
    assert caught.value.spent_usd == pytest.approx(0.5) and caught.value.reserved_usd == pytest.approx(0.3)
    assert "monthly budget" in str(caught.value) and "held by requests in flight" in str(caught.value)
    ledger.record(_entry("k", "gpt", 0.1, NOW), reservation=first)  # settled: held 0.3 becomes spent 0.1
    assert ledger.held("k") == 0
    second = ledger.reserve("k", 0.3, 1.0, since, ttl_s=60)
    clock.now += 61  # its request crashed: the hold expires
    assert ledger.held("k") == 0
    ledger.reserve("k", 0.35, 1.0, since, ttl_s=60)
    ledger.release(second)  # harmless after expiry


def test_concurrent_reservations_across_processes_never_overshoot(path):
    # two Ledger objects on one file stand for two gateway replicas; each thread reserves as fast as it can
    ledgers = [Ledger(path), Ledger(path)]
    since, granted = 0.0, []
    lock = threading.Lock()

    def spend(ledger: Ledger) -> None:
        while True:
            try:
                reservation = ledger.reserve("k", 0.1, 1.0, since, ttl_s=600)
            except BudgetExceeded:
                return
            with lock:
                granted.append(reservation)

    threads = [threading.Thread(target=spend, args=(ledgers[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 10  # exactly the budget, not one hold more
    assert ledgers[0].held("k") == pytest.approx(1.0)


# -- costs and the recorder -----------------------------------------------------------------------


def test_cost_functions():
    assert cloud_cost(2.5, 10, 1_000_000, 0) == pytest.approx(2.5)
    assert cloud_cost(2.5, 10, 1000, 500) == pytest.approx(0.0025 + 0.005)
    assert local_cost(3.6, 10) == pytest.approx(0.01)


def test_replica_share_splits_time_fairly():
    clock = Clock(0.0)
    share = ReplicaShare(replicas=1, clock=clock)
    a = share.start()
    clock.now = 2.0
    b = share.start()  # a had the replica alone for 2 s
    clock.now = 4.0  # both share it for 2 s: 1 s each
    assert share.stop(a) == pytest.approx(3.0)
    clock.now = 5.0
    assert share.stop(b) == pytest.approx(2.0)
    assert share.in_flight == 0


def _recorder(path, **config) -> SpendRecorder:
    return SpendRecorder(AuthConfig(**config), Ledger(path), local_rates={"small": 3.6},
                         cloud_prices={"mini": CloudPrice(1.0, 2.0)})


async def test_the_recorder_prices_local_time_and_cloud_tokens_in_one_durable_row(path):
    recorder = _recorder(path, local_hourly_rate_usd=36.0)
    outcome = Outcome("auto", "mini", "gpt-mini", prompt_tokens=1000, completion_tokens=500,
                      replica_s={"small": 2.0}, cloud_target="mini")  # a local attempt, then the cloud answered
    cost = await recorder.settle(None, None, outcome)
    assert cost == pytest.approx(2.0 * 3.6 / 3600 + (1000 * 1.0 + 500 * 2.0) / 1e6)
    assert recorder.cost(Outcome("direct", "embed", "embed", replica_s={"embed": 1.0})) == pytest.approx(0.01)
    with Ledger(path) as other:  # durable: another connection reads it at once
        [row] = other.usage(group_by=("route", "target"))
        assert row["cost_usd"] == pytest.approx(cost) and row["requests"] == 1


async def test_reserve_refuses_over_budget_and_over_the_per_request_ceiling(path):
    recorder = _recorder(path)
    store = KeyStore(path)
    key = store.create("a", budget_usd=0.01, max_request_usd=0.004).record
    assert await recorder.reserve(None, 100.0) is None  # anonymous: nothing to hold against
    with pytest.raises(CostCeilingExceeded, match="ceiling"):
        await recorder.reserve(key, 0.005)
    held = [await recorder.reserve(key, 0.004), await recorder.reserve(key, 0.004)]
    with pytest.raises(BudgetExceeded):
        await recorder.reserve(key, 0.004)
    await recorder.settle(key, held[0], Outcome("direct", "small", "small", replica_s={"small": 1.0}))
    await recorder.reserve(key, 0.004)  # 0.001 spent + 0.004 held + 0.004 fits 0.01
    unbudgeted = store.create("b").record
    assert await recorder.reserve(unbudgeted, 5.0) is None
    assert await asyncio.to_thread(recorder.ledger.spend, key.key_id) == pytest.approx(0.001)


class _CountingLedger(Ledger):
    """A real ledger that keeps the size of each transaction ``record_many`` commits; ``fail`` makes the
    next commit refuse as a full disk would, ``hold`` keeps commits waiting until it is set."""

    def __init__(self, path):
        super().__init__(path)
        self.commits: list[int] = []
        self.fail = False
        self.entered, self.hold = threading.Event(), threading.Event()
        self.hold.set()

    def record_many(self, rows):
        self.entered.set()
        self.hold.wait(10)
        if self.fail:
            self.fail = False
            raise sqlite3.OperationalError("database or disk is full")
        super().record_many(rows)
        self.commits.append(len(rows))


def _rows(path) -> int:
    other = sqlite3.connect(path)
    try:
        return other.execute("SELECT COUNT(*) FROM spend").fetchone()[0]
    finally:
        other.close()


async def test_requests_that_end_together_share_one_durable_commit(path):
    ledger = _CountingLedger(path)
    recorder = SpendRecorder(AuthConfig(), ledger)
    outcomes = [Outcome("direct", "small", "small", completion_tokens=i) for i in range(32)]
    await asyncio.gather(*(recorder.settle(None, None, o) for o in outcomes))
    assert ledger.commits == [32]  # one transaction, one flush to disk, for 32 requests
    assert _rows(path) == 32  # and each settle returned after its row was on disk
    await recorder.settle(None, None, outcomes[0])  # a later request commits on its own
    assert ledger.commits == [32, 1] and _rows(path) == 33


async def test_a_refused_commit_fails_every_request_in_it_and_the_next_ones_still_commit(path):
    ledger = _CountingLedger(path)
    recorder = SpendRecorder(AuthConfig(), ledger)
    ledger.fail = True
    results = await asyncio.gather(*(recorder.settle(None, None, Outcome("direct", "m", "m")) for _ in range(3)),
                                   return_exceptions=True)
    assert [type(r) for r in results] == [sqlite3.OperationalError] * 3
    assert _rows(path) == 0
    await recorder.settle(None, None, Outcome("direct", "m", "m"))
    assert _rows(path) == 1


async def test_a_request_cancelled_while_its_row_commits_still_gets_its_row(path):
    ledger = _CountingLedger(path)
    recorder = SpendRecorder(AuthConfig(), ledger)
    ledger.hold.clear()
    task = asyncio.ensure_future(recorder.settle(None, None, Outcome("direct", "m", "m")))
    assert await asyncio.to_thread(ledger.entered.wait, 10)
    task.cancel()  # the client went away mid-commit
    with pytest.raises(asyncio.CancelledError):
        await task
    ledger.hold.set()
    for _ in range(200):
        if ledger.commits:
            break
        await asyncio.sleep(0.01)
    assert ledger.commits == [1] and _rows(path) == 1
