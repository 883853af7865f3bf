"""The typed settings of authentication and accounting: ``auth`` in ``serve_config.yaml``'s args.

``mode`` is explicit and fails closed: ``keys`` requires a valid API key on every ``/v1`` route
whatever the ledger holds (a missing or empty ledger refuses everyone); ``open`` lets anonymous
callers in with full access (the laptop default) while keys that are sent still identify, limit and
charge their caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from ray_app.paths import DataDir
from ray_app.schema import Strict

__all__ = ["AuthConfig", "AuthMode"]

AuthMode = Literal["open", "keys"]


class AuthConfig(Strict):
    """API keys, budgets, per-request caps, and the spend ledger."""

    mode: AuthMode = Field(
        "open", description="open: anonymous callers allowed (full access); keys: every /v1 request needs a "
                            "valid key, even when no key exists yet (fail closed).")
    ledger_path: str | None = Field(
        None, description="SQLite file for keys, spend and budget reservations; default "
                          "<data_dir>/router/ledger.sqlite. Every gateway replica must see the same file.")
    budget_period: Literal["day", "month"] = Field("month", description="Period a key's budget covers (UTC).")
    default_budget_usd: PositiveFloat | None = Field(None, description="Budget of keys without their own.")
    default_rpm: PositiveInt | None = Field(60, description="Requests per minute of keys without their own.")
    default_tpm: PositiveInt | None = Field(100_000, description="Tokens per minute of keys without their own.")
    max_n: PositiveInt = Field(8, description="Largest `n` (choices per request) anyone may ask for.")
    default_max_tokens: PositiveInt = Field(
        1024, description="max_tokens given to a request of a key with a budget that sets none, so its "
                          "reservation bounds what it can cost.")
    local_hourly_rate_usd: PositiveFloat = Field(
        0.50, description="USD per replica-hour of served models that no router target prices (embedders, "
                          "models named directly).")
    local_decode_tokens_per_s: PositiveFloat = Field(
        30.0, description="Decode speed assumed when reserving budget for a direct request to a local model.")
    reservation_ttl_s: PositiveFloat = Field(
        900.0, description="A reservation older than this (its request crashed) no longer holds budget.")

    def ledger_file(self, paths: DataDir) -> Path:
        if self.ledger_path:
            return Path(self.ledger_path).expanduser().resolve()
        return paths.root / "router" / "ledger.sqlite"
