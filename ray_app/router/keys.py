"""Router API keys and what each key may spend: budgets and request/token rate limits.

A key looks like ``rk-<key_id>-<secret>``. ``key_id`` is public (listings, ledger rows, logs); only a
salted SHA-256 of the secret is stored. SHA-256 rather than a slow KDF is deliberate: the secret is 256
random bits, not a password, so brute force is hopeless anyway and every request can afford the check.
Keys live in the ledger's SQLite file, in their own table.

``Quotas`` raises ``BudgetExceeded`` (HTTP 402 at the edge) and ``RateLimited`` (429 with Retry-After).
Its sliding windows live in memory, so with several gateway replicas each enforces its own share.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ray_app.router.config import KeysConfig
from ray_app.router.ledger import Ledger, connect

__all__ = ["AuthError", "BudgetExceeded", "KeyRecord", "KeyStore", "NewKey", "Quotas", "RateLimited"]

_PREFIX = "rk"
_WINDOW_S = 60.0


class AuthError(Exception):
    """The bearer token is not a live key (401). The message never contains the token."""


class BudgetExceeded(Exception):
    def __init__(self, key_id: str, spent_usd: float, budget_usd: float, period: str):
        self.key_id, self.spent_usd, self.budget_usd, self.period = key_id, spent_usd, budget_usd, period
        adjective = {"day": "daily", "month": "monthly"}.get(period, period)
        super().__init__(f"key {key_id} has spent ${spent_usd:.4f} of its ${budget_usd:.2f} {adjective} budget")


class RateLimited(Exception):
    def __init__(self, key_id: str, limit: Literal["rpm", "tpm"], retry_after_s: float, detail: str):
        self.key_id, self.limit, self.retry_after_s = key_id, limit, retry_after_s
        super().__init__(f"key {key_id}: {detail}; retry after {retry_after_s:.1f}s")


@dataclass(frozen=True)
class KeyRecord:
    """A key as listed and as returned by ``authenticate``; holds neither the secret nor its hash."""

    key_id: str
    name: str
    created_at: float
    revoked_at: float | None = None
    budget_usd: float | None = None  # per budget period; None: the config default
    rpm: int | None = None
    tpm: int | None = None
    confidential: bool = False  # every request with this key stays on local targets

    @property
    def prefix(self) -> str:
        """What listings show in place of the key."""
        return f"{_PREFIX}-{self.key_id}-..."


@dataclass(frozen=True)
class NewKey:
    record: KeyRecord
    secret: str = field(repr=False)  # the full bearer token; shown to the creator once, never stored


def _hash(salt: bytes, token: str) -> bytes:
    return hashlib.sha256(salt + token.encode()).digest()


class KeyStore:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(path)
        with self._lock, self._db:
            self._db.execute("""
                CREATE TABLE IF NOT EXISTS api_keys (
                    key_id TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL, hash BLOB NOT NULL,
                    created_at REAL NOT NULL, revoked_at REAL, budget_usd REAL, rpm INTEGER, tpm INTEGER,
                    confidential INTEGER NOT NULL DEFAULT 0)""")

    def create(self, name: str, *, budget_usd: float | None = None, rpm: int | None = None,
               tpm: int | None = None, confidential: bool = False) -> NewKey:
        key_id = secrets.token_hex(6)
        token = f"{_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        record = KeyRecord(key_id, name, self._clock(), None, budget_usd, rpm, tpm, confidential)
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO api_keys (key_id, name, salt, hash, created_at, budget_usd, rpm, tpm, confidential) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, salt, _hash(salt, token), record.created_at, budget_usd, rpm, tpm,
                 int(confidential)))
        return NewKey(record, token)

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [_record(row) for row in rows]

    def revoke(self, key_id: str) -> None:
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (self._clock(), key_id))
        if cursor.rowcount == 0 and self.get(key_id) is None:
            raise KeyError(f"no key {key_id!r}")

    def get(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return _record(row) if row else None

    def authenticate(self, bearer: str) -> KeyRecord:
        """The live key for a bearer token (an ``Authorization`` value or the bare token)."""
        token = bearer.removeprefix("Bearer ").strip()
        parts = token.split("-", 2)
        if len(parts) != 3 or parts[0] != _PREFIX:
            raise AuthError("malformed API key")
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS}, salt, hash FROM api_keys WHERE key_id = ?",
                                   (parts[1],)).fetchone()
        if row is None or not hmac.compare_digest(_hash(row[-2], token), row[-1]):
            raise AuthError("invalid API key")
        record = _record(row[:-2])
        if record.revoked_at is not None:
            raise AuthError(f"API key {record.key_id} has been revoked")
        return record

    def close(self) -> None:
        with self._lock:
            self._db.close()


_COLUMNS = "key_id, name, created_at, revoked_at, budget_usd, rpm, tpm, confidential"


def _record(row: sqlite3.Row | tuple) -> KeyRecord:
    key_id, name, created_at, revoked_at, budget_usd, rpm, tpm, confidential = row
    return KeyRecord(key_id, name, created_at, revoked_at, budget_usd, rpm, tpm, bool(confidential))


class Quotas:
    """Checks a key's budget (spend in the ledger this period) and its RPM/TPM sliding windows."""

    def __init__(self, ledger: Ledger, config: KeysConfig, clock: Callable[[], float] = time.time):
        self.ledger = ledger
        self.config = config
        self._clock = clock
        self._requests: dict[str, deque[float]] = defaultdict(deque)
        self._tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def period_start(self, now: float) -> float:
        day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return (day if self.config.budget_period == "day" else day.replace(day=1)).timestamp()

    def check_budget(self, key: KeyRecord) -> None:
        budget = key.budget_usd if key.budget_usd is not None else self.config.default_budget_usd
        if budget is None:
            return
        spent = self.ledger.spend(key.key_id, since=self.period_start(self._clock()))
        if spent >= budget:
            raise BudgetExceeded(key.key_id, spent, budget, self.config.budget_period)

    def admit(self, key: KeyRecord, tokens: int) -> None:
        """Count one request of about ``tokens`` tokens against the key's windows, or raise RateLimited."""
        now = self._clock()
        requests, used = self._requests[key.key_id], self._tokens[key.key_id]
        while requests and requests[0] <= now - _WINDOW_S:
            requests.popleft()
        while used and used[0][0] <= now - _WINDOW_S:
            used.popleft()
        rpm = key.rpm if key.rpm is not None else self.config.default_rpm
        tpm = key.tpm if key.tpm is not None else self.config.default_tpm
        if rpm is not None and len(requests) >= rpm:
            raise RateLimited(key.key_id, "rpm", requests[len(requests) - rpm] + _WINDOW_S - now,
                              f"{rpm} requests per minute")
        if tpm is not None:
            if tokens > tpm:
                raise RateLimited(key.key_id, "tpm", _WINDOW_S,
                                  f"request needs ~{tokens} tokens, more than the {tpm} tokens per minute limit")
            total = sum(n for _, n in used)
            if total + tokens > tpm:
                raise RateLimited(key.key_id, "tpm", self._tokens_free_at(used, total + tokens - tpm) - now,
                                  f"{tpm} tokens per minute")
        requests.append(now)
        used.append((now, tokens))

    def settle(self, key: KeyRecord, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token window once the real usage of an admitted request is known."""
        self._tokens[key.key_id].append((self._clock(), actual_tokens - estimated_tokens))

    def check(self, key: KeyRecord, tokens: int) -> None:
        self.check_budget(key)
        self.admit(key, tokens)

    @staticmethod
    def _tokens_free_at(used: deque[tuple[float, int]], excess: int) -> float:
        freed = 0
        for ts, n in used:
            freed += n
            if freed >= excess:
                return ts + _WINDOW_S
        return used[-1][0] + _WINDOW_S
