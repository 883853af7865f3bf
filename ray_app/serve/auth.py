"""API keys at the edge: who is calling, whether they may, and what their requests cost.

``Auth`` is a plain class over the router's key store, quotas and ledger (one SQLite file).
``KeyAuth`` is the ASGI middleware that runs it before any ``/v1`` route: once a live key exists,
every ``/v1`` request needs ``Authorization: Bearer rk-...`` (401), a key over its budget gets 402,
and one over its request or token rate gets 429 with ``retry-after``. Before the first key is created
the API stays open, so a laptop install works without set-up; a token that is not one of ours (the
``openai`` SDK always sends one) is then ignored. The caller is put in a context variable for the
routes below, which charge the key and pass its confidentiality on to the router.
"""

from __future__ import annotations

import asyncio
import math
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from ray_app.router.config import RouterConfig
from ray_app.router.keys import AuthError, BudgetExceeded, KeyRecord, KeyStore, Quotas, RateLimited
from ray_app.router.ledger import Ledger, LedgerEntry
from ray_app.serve.errors import (
    APIError,
    AuthenticationError,
    BudgetExceededError,
    RateLimitError,
    error_response,
)

__all__ = ["CALLER", "Auth", "Caller", "KeyAuth"]


@dataclass
class Caller:
    key: KeyRecord | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased request headers
    estimated_tokens: int = 0  # what the rate limiter was charged up front

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key else None


CALLER: ContextVar[Caller] = ContextVar("ray_app_caller", default=Caller())


def current_caller() -> dict:
    """What the router needs to know about the caller, as plain data that crosses a handle."""
    caller = CALLER.get()
    return {"key_id": caller.key_id, "confidential": bool(caller.key and caller.key.confidential),
            "headers": caller.headers}


class Auth:
    def __init__(self, config: RouterConfig):
        self.config = config
        path = config.ledger_path()
        self.keys = KeyStore(path)
        self.ledger = Ledger(path)
        self.quotas = Quotas(self.ledger, config.keys)

    def required(self) -> bool:
        return any(k.revoked_at is None for k in self.keys.list())

    def authorize(self, authorization: str | None, estimated_tokens: int) -> KeyRecord | None:
        """The caller's key (None for an anonymous caller while no key exists); raises 401/402/429."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        required = self.required()
        if not token.startswith("rk-"):
            if required:
                raise AuthenticationError("this server requires an API key: send `Authorization: Bearer rk-...` "
                                          "(create one with `ray-app keys create`)")
            return None
        try:
            key = self.keys.authenticate(token)
        except AuthError as e:
            raise AuthenticationError(str(e)) from None
        try:
            self.quotas.check(key, estimated_tokens)
        except BudgetExceeded as e:
            raise BudgetExceededError(str(e)) from None
        except RateLimited as e:
            raise RateLimitError(str(e), code=f"rate_limit_exceeded_{e.limit}",
                                 headers={"retry-after": str(max(1, math.ceil(e.retry_after_s)))}) from None
        return key

    def settle(self, caller: Caller, actual_tokens: int) -> None:
        if caller.key is not None:
            self.quotas.settle(caller.key, caller.estimated_tokens, actual_tokens)

    def on_usage(self, record) -> None:
        """A request that named a served model directly finished (``OpenAIService.on_usage``)."""
        asyncio.get_running_loop().create_task(self.record_direct(
            CALLER.get(), record.model, record.endpoint, record.prompt_tokens, record.completion_tokens,
            record.seconds))

    def on_routed(self, info) -> None:
        """A routed request finished: the router has charged it; correct the key's token window."""
        if info.usage:
            self.settle(CALLER.get(), int(info.usage.get("total_tokens") or 0))

    async def record_direct(self, caller: Caller, model: str, endpoint: str, prompt_tokens: int,
                            completion_tokens: int, seconds: float) -> None:
        """Spend of a request that named a served model directly: its latency at the local rate."""
        self.settle(caller, prompt_tokens + completion_tokens)
        entry = LedgerEntry(key_id=caller.key_id, route="direct", target=model, model=model,
                            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            cost_usd=seconds * self.config.local_hourly_rate_usd / 3600, latency_s=seconds,
                            status="ok")
        await asyncio.to_thread(self.ledger.record, entry)  # durable (fsync) without blocking the loop


class KeyAuth:
    """ASGI middleware: authorise every ``/v1`` request and set ``CALLER`` for the routes."""

    def __init__(self, app: ASGIApp, auth: Auth, chars_per_token: float = 4.0):
        self.app, self.auth, self.chars_per_token = app, auth, chars_per_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # The body is not read yet; its size bounds the prompt, and the token window is corrected
        # with the real count when the request completes.
        estimated = int(int(headers.get("content-length") or 0) / self.chars_per_token)
        try:
            key = await asyncio.to_thread(self.auth.authorize, headers.get("authorization"), estimated)
        except APIError as error:
            return await error_response(error)(scope, receive, send)
        token = CALLER.set(Caller(key, {k: v for k, v in headers.items() if k != "authorization"}, estimated))
        try:
            await self.app(scope, receive, send)
        finally:
            CALLER.reset(token)

