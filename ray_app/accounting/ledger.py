"""The spend ledger: one SQLite row per request, and the budget reservations of requests in flight.

Several processes may share the file (gateway replicas on one node, the CLI): WAL lets readers work
beside the writer, and every check-and-write runs in one ``BEGIN IMMEDIATE`` transaction, so two
requests of one key cannot both pass a budget check that only one of them fits. Commits use
``synchronous=FULL``: when ``settle`` returns, the row is on disk.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

__all__ = ["BudgetExceeded", "GroupBy", "Ledger", "LedgerEntry", "connect"]

GroupBy = Literal["key", "model", "day", "route", "target", "status"]
# Whitelisted SQL expressions for grouping: the only parts of a query built from arguments.
_GROUP_SQL: dict[str, str] = {
    "key": "key_id", "model": "model", "route": "route", "target": "target", "status": "status",
    "day": "date(ts, 'unixepoch')",
}
_TOTALS = ["COUNT(*) AS requests", "COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens",
           "COALESCE(SUM(completion_tokens), 0) AS completion_tokens", "COALESCE(SUM(cost_usd), 0) AS cost_usd"]


class BudgetExceeded(Exception):
    def __init__(self, key_id: str, spent_usd: float, reserved_usd: float, needed_usd: float, budget_usd: float,
                 period: str):
        self.key_id, self.spent_usd, self.budget_usd, self.period = key_id, spent_usd, budget_usd, period
        self.reserved_usd, self.needed_usd = reserved_usd, needed_usd
        adjective = {"day": "daily", "month": "monthly"}.get(period, period)
        held = f" (${reserved_usd:.4f} more held by requests in flight)" if reserved_usd else ""
        super().__init__(f"key {key_id} has spent ${spent_usd:.4f} of its ${budget_usd:.2f} {adjective} budget{held}; "
                         f"this request may cost up to ${needed_usd:.4f}")


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the ledger file in WAL mode, commits flushed to disk, transactions explicit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Used from worker threads by async callers; every use is serialised by the owner's lock.
    db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


@dataclass(frozen=True)
class LedgerEntry:
    key_id: str | None
    route: str  # "direct" for a request naming a served model, else the route
    target: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float
    status: str  # "ok", "incomplete" (client left), "upstream_error", ...
    ts: float = field(default_factory=time.time)


class Ledger:
    def __init__(self, path: str | Path, clock=time.time):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.path)
        with self._transaction():
            self._db.execute("""
                CREATE TABLE IF NOT EXISTS spend (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    ts REAL NOT NULL, key_id TEXT, route TEXT NOT NULL, target TEXT NOT NULL, model TEXT NOT NULL,
                    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
                    latency_s REAL NOT NULL, status TEXT NOT NULL)""")
            self._db.execute("CREATE INDEX IF NOT EXISTS spend_key_ts ON spend (key_id, ts)")
            self._db.execute("""
                CREATE TABLE IF NOT EXISTS reservations (
                    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, amount_usd REAL NOT NULL, expires_at REAL NOT NULL)""")

    @contextmanager
    def _transaction(self, immediate: bool = False) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- budgets -------------------------------------------------------------------------------

    def reserve(self, key_id: str, amount_usd: float, budget_usd: float, since: float, ttl_s: float,
                period: str = "month") -> str:
        """Hold ``amount_usd`` of the key's budget for one request, or raise ``BudgetExceeded`` when the
        spend since ``since`` plus what requests in flight hold leaves too little. Atomic across processes."""
        now = self._clock()
        with self._transaction(immediate=True):
            self._db.execute("DELETE FROM reservations WHERE expires_at <= ?", (now,))
            spent = self._spent(key_id, since)
            (held,) = self._db.execute("SELECT COALESCE(SUM(amount_usd), 0) FROM reservations WHERE key_id = ?",
                                       (key_id,)).fetchone()
            if spent + held + amount_usd > budget_usd:
                raise BudgetExceeded(key_id, spent, held, amount_usd, budget_usd, period)
            reservation = uuid.uuid4().hex
            self._db.execute("INSERT INTO reservations (id, key_id, amount_usd, expires_at) VALUES (?, ?, ?, ?)",
                             (reservation, key_id, amount_usd, now + ttl_s))
        return reservation

    def record(self, entry: LedgerEntry, reservation: str | None = None) -> None:
        """Write the request's row and release its reservation in one durable transaction."""
        self.record_many([(entry, reservation)])

    def record_many(self, rows: Sequence[tuple[LedgerEntry, str | None]]) -> None:
        """Write several requests' rows and release their reservations in one durable transaction: one
        flush to disk for all of them."""
        with self._transaction():
            self._db.executemany("DELETE FROM reservations WHERE id = ?",
                                 [(reservation,) for _, reservation in rows if reservation is not None])
            self._db.executemany(
                "INSERT INTO spend (ts, key_id, route, target, model, prompt_tokens, completion_tokens, "
                "cost_usd, latency_s, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.ts, e.key_id, e.route, e.target, e.model, e.prompt_tokens, e.completion_tokens, e.cost_usd,
                  e.latency_s, e.status) for e, _ in rows])

    def release(self, reservation: str) -> None:
        """Give a reservation back without a row (the request was refused before it ran)."""
        with self._transaction():
            self._db.execute("DELETE FROM reservations WHERE id = ?", (reservation,))

    def held(self, key_id: str) -> float:
        with self._lock:
            (held,) = self._db.execute(
                "SELECT COALESCE(SUM(amount_usd), 0) FROM reservations WHERE key_id = ? AND expires_at > ?",
                (key_id, self._clock())).fetchone()
        return float(held)

    # -- reading -------------------------------------------------------------------------------

    def _spent(self, key_id: str, since: float | None) -> float:
        where, params = _where(key_id, since, None)
        (total,) = self._db.execute(f"SELECT COALESCE(SUM(cost_usd), 0) FROM spend {where}", params).fetchone()
        return float(total)

    def spend(self, key_id: str, since: float | None = None) -> float:
        """Total USD charged to a key since ``since`` (a Unix time)."""
        with self._lock:
            return self._spent(key_id, since)

    def usage(self, key_id: str | None = None, since: float | None = None, until: float | None = None,
              group_by: Sequence[GroupBy] = ("key", "model", "day")) -> list[dict[str, Any]]:
        """Requests, tokens and cost per group, e.g. ``{"key": ..., "model": ..., "day": "2025-01-31", ...}``."""
        unknown = [g for g in group_by if g not in _GROUP_SQL]
        if unknown:
            raise ValueError(f"group_by: unknown {unknown}; choose from {sorted(_GROUP_SQL)}")
        where, params = _where(key_id, since, until)
        columns = [f'{_GROUP_SQL[g]} AS "{g}"' for g in group_by]
        groups = ", ".join(f'"{g}"' for g in group_by)
        sql = (f"SELECT {', '.join(columns + _TOTALS)} FROM spend {where}"
               + (f" GROUP BY {groups} ORDER BY {groups}" if group_by else ""))
        with self._lock:
            cursor = self._db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        return [row for row in rows if row["requests"]]  # an ungrouped query over no rows still returns one

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM spend").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _where(key_id: str | None, since: float | None, until: float | None) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for clause, value in (("key_id = ?", key_id), ("ts >= ?", since), ("ts < ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
