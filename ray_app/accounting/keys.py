"""API keys: who may call, what they may touch (scopes), and the limits that apply to them.

A key looks like ``rk-<key_id>-<secret>``. ``key_id`` is public (listings, ledger rows, logs); only a
salted SHA-256 of the secret is stored. SHA-256 rather than a slow KDF is deliberate: the secret is 256
random bits, not a password, so brute force is hopeless anyway and every request can afford the check.
Keys live in the ledger's SQLite file, in their own table.

Scopes follow Qdrant's JWT access rules: ``admin`` (key-independent operations: deleting documents,
creating and dropping collections, the cluster's status, everyone's usage), per-collection ``read``
(retrieval and RAG) and ``write`` (uploads), and a sensitivity ``clearance``: a key never retrieves a
chunk labelled above it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ray_app.accounting.ledger import connect
from ray_app.sensitivity import LEVELS, Sensitivity, up_to

__all__ = ["ANONYMOUS_OPEN", "AuthError", "KeyRecord", "KeyStore", "NewKey", "Scopes"]

_PREFIX = "rk"


class AuthError(Exception):
    """The bearer token is not a live key (401). The message never contains the token."""


@dataclass(frozen=True)
class Scopes:
    admin: bool = False
    read: tuple[str, ...] = ("*",)  # collections this key may retrieve from; "*" is every collection
    write: tuple[str, ...] = ()  # collections it may upload to
    clearance: Sensitivity = "internal"  # the most sensitive chunk label it may retrieve
    fine_tune: bool = False  # may upload training files and start fine-tuning jobs

    def __post_init__(self) -> None:
        if self.clearance not in LEVELS:
            raise ValueError(f"clearance must be one of {LEVELS}, not {self.clearance!r}")

    def can_read(self, collection: str) -> bool:
        return self.admin or "*" in self.read or collection in self.read

    def can_write(self, collection: str) -> bool:
        return self.admin or "*" in self.write or collection in self.write

    @property
    def labels(self) -> list[Sensitivity]:
        return up_to(self.clearance)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> Scopes:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(bool(data.get("admin")), tuple(data.get("read", ("*",))), tuple(data.get("write", ())),
                   data.get("clearance", "internal"), bool(data.get("fine_tune")))


ANONYMOUS_OPEN = Scopes(admin=True, read=("*",), write=("*",), clearance="confidential", fine_tune=True)


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
    scopes: Scopes = field(default_factory=Scopes)
    max_tokens: int | None = None  # per request
    max_n: int | None = None
    max_request_usd: float | None = None  # a request whose estimate is over this is refused (or routed cheaper)
    capture: bool = False  # served chats of this key are kept as training conversations

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


_LIMITS = ("budget_usd", "rpm", "tpm", "max_tokens", "max_n", "max_request_usd")
_COLUMNS = "key_id, name, created_at, revoked_at, confidential, scopes, limits, capture"


class KeyStore:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._db = connect(path)
        with self._lock:
            self._db.execute("""
                CREATE TABLE IF NOT EXISTS api_keys (
                    key_id TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL, hash BLOB NOT NULL,
                    created_at REAL NOT NULL, revoked_at REAL, budget_usd REAL, rpm INTEGER, tpm INTEGER,
                    confidential INTEGER NOT NULL DEFAULT 0)""")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
            # files written before scopes existed: their keys get the default scopes
            for name, decl in (("scopes", "TEXT"), ("limits", "TEXT"), ("capture", "INTEGER NOT NULL DEFAULT 0")):
                if name not in columns:
                    self._db.execute(f"ALTER TABLE api_keys ADD COLUMN {name} {decl}")
            if "budget_usd" in columns and "limits" not in columns:
                self._db.execute("UPDATE api_keys SET limits = json_object('budget_usd', budget_usd, 'rpm', rpm, "
                                 "'tpm', tpm)")

    def create(self, name: str, *, budget_usd: float | None = None, rpm: int | None = None, tpm: int | None = None,
               confidential: bool = False, scopes: Scopes | None = None, max_tokens: int | None = None,
               max_n: int | None = None, max_request_usd: float | None = None, capture: bool = False) -> NewKey:
        key_id = secrets.token_hex(6)
        token = f"{_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        record = KeyRecord(key_id, name, self._clock(), None, budget_usd, rpm, tpm, confidential,
                           scopes or Scopes(), max_tokens, max_n, max_request_usd, capture)
        limits = json.dumps({k: getattr(record, k) for k in _LIMITS})
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, name, salt, hash, created_at, confidential, scopes, limits, capture) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, salt, _hash(salt, token), record.created_at, int(confidential),
                 record.scopes.to_json(), limits, int(capture)))
        return NewKey(record, token)

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [_record(row) for row in rows]

    def active(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]

    def revoke(self, key_id: str) -> None:
        with self._lock:
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


def _record(row: sqlite3.Row | tuple) -> KeyRecord:
    key_id, name, created_at, revoked_at, confidential, scopes, limits, capture = row
    values = json.loads(limits) if limits else {}
    return KeyRecord(key_id, name, created_at, revoked_at, confidential=bool(confidential),
                     scopes=Scopes.from_json(scopes), capture=bool(capture),
                     **{k: values.get(k) for k in _LIMITS})


def with_scopes(record: KeyRecord, **changes) -> KeyRecord:
    return replace(record, scopes=replace(record.scopes, **changes))


def parse_collections(values: Iterable[str]) -> tuple[str, ...]:
    """CLI/API lists of collection names (comma-separated allowed)."""
    out: list[str] = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return tuple(dict.fromkeys(out))
