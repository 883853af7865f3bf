"""The spend ledger: one SQLite row per routed request, and the cost functions that price them.

SQLite in WAL mode lets the key store (same file, its own table) and readers work alongside the
writer. ``record`` commits with ``synchronous=FULL`` before it returns, so a crash right after a
request cannot lose the spend that budgets are checked against.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from ray_app.router.config import Target

__all__ = ["GroupBy", "Ledger", "LedgerEntry", "cloud_cost", "connect", "local_cost"]

GroupBy = Literal["key", "model", "day", "route", "target", "status"]
# Whitelisted SQL expressions for grouping: the only parts of a query built from arguments.
_GROUP_SQL: dict[str, str] = {
    "key": "key_id", "model": "model", "route": "route", "target": "target", "status": "status",
    "day": "date(ts, 'unixepoch')",
}


def cloud_cost(target: Target, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for one request to a per-token-priced target."""
    if target.price_in_per_mtok is None or target.price_out_per_mtok is None:
        raise ValueError(f"target {target.name!r} has no per-token prices")
    return (prompt_tokens * target.price_in_per_mtok + completion_tokens * target.price_out_per_mtok) / 1e6


def local_cost(target: Target, replica_seconds: float) -> float:
    """USD for the replica time one request used (its share when a replica serves several at once)."""
    if target.hourly_rate_usd is None:
        # Config validation requires a rate for local targets; a silent 0 would make them look free.
        raise ValueError(f"target {target.name!r} has no hourly_rate_usd")
    return replica_seconds * target.hourly_rate_usd / 3600


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the router's SQLite file, in WAL mode, with commits flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Used from a thread pool by async callers; every use is serialised by the owner's lock.
    db = sqlite3.connect(path, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


@dataclass(frozen=True)
class LedgerEntry:
    key_id: str | None
    route: str
    target: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float
    status: str  # "ok", or an error class such as "rate_limited", "timeout", "upstream_error"
    ts: float = field(default_factory=time.time)


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = connect(self.path)
        with self._lock, self._db:
            self._db.execute("""
                CREATE TABLE IF NOT EXISTS spend (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    ts REAL NOT NULL, key_id TEXT, route TEXT NOT NULL, target TEXT NOT NULL, model TEXT NOT NULL,
                    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
                    latency_s REAL NOT NULL, status TEXT NOT NULL)""")
            self._db.execute("CREATE INDEX IF NOT EXISTS spend_key_ts ON spend (key_id, ts)")

    def record(self, entry: LedgerEntry) -> None:
        with self._lock, self._db:  # the connection context manager commits before we return
            self._db.execute(
                "INSERT INTO spend (ts, key_id, route, target, model, prompt_tokens, completion_tokens, "
                "cost_usd, latency_s, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.ts, entry.key_id, entry.route, entry.target, entry.model, entry.prompt_tokens,
                 entry.completion_tokens, entry.cost_usd, entry.latency_s, entry.status))

    def usage(self, key_id: str | None = None, since: float | None = None, until: float | None = None,
              group_by: Sequence[GroupBy] = ("key", "model", "day")) -> list[dict[str, Any]]:
        """Requests, tokens and cost per group, e.g. ``{"key": ..., "model": ..., "day": "2025-01-31", ...}``."""
        unknown = [g for g in group_by if g not in _GROUP_SQL]
        if unknown:
            raise ValueError(f"group_by: unknown {unknown}; choose from {sorted(_GROUP_SQL)}")
        where, params = self._where(key_id, since, until)
        columns = [f'{_GROUP_SQL[g]} AS "{g}"' for g in group_by]
        groups = ", ".join(f'"{g}"' for g in group_by)
        sql = (f"SELECT {', '.join(columns + _TOTALS)} FROM spend {where}"
               + (f" GROUP BY {groups} ORDER BY {groups}" if group_by else ""))
        with self._lock:
            cursor = self._db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        return [row for row in rows if row["requests"]]  # an ungrouped query over no rows still returns one

    def spend(self, key_id: str, since: float | None = None) -> float:
        """Total USD charged to a key since ``since`` (a Unix time)."""
        where, params = self._where(key_id, since, None)
        with self._lock:
            query = f"SELECT COALESCE(SUM(cost_usd), 0) FROM spend {where}"
            (total,) = self._db.execute(query, params).fetchone()
        return float(total)

    @staticmethod
    def _where(key_id: str | None, since: float | None, until: float | None) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for clause, value in (("key_id = ?", key_id), ("ts >= ?", since), ("ts < ?", until)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), params

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TOTALS = ["COUNT(*) AS requests", "COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens",
           "COALESCE(SUM(completion_tokens), 0) AS completion_tokens", "COALESCE(SUM(cost_usd), 0) AS cost_usd"]
