"""API keys at the edge: who is calling, and whether they may.

``Auth`` is a plain class over the key store and the rate windows; ``KeyAuth`` is the ASGI middleware
that runs it on the request's headers, before any body is read (so an anonymous client cannot make the
gateway buffer an upload), for every ``/v1`` route:

- ``mode: keys`` needs ``Authorization: Bearer rk-...`` on every request (401), whether or not the
  ledger holds any key: it fails closed.
- ``mode: open`` lets anonymous callers in with full access; a token that is not one of ours (the
  ``openai`` SDK always sends one) is then ignored, and a key that is sent still identifies, limits
  and charges its caller.

Over its rate a key gets 429 with ``retry-after``; the token estimate (Content-Length / 4) is only
made for routes that consume tokens. The resulting ``Caller`` rides in the ASGI scope's state; routes
get it with ``caller_of(request)`` and check its scopes. The key itself never travels further.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ray_app.accounting.config import AuthConfig, AuthMode
from ray_app.accounting.keys import ANONYMOUS_OPEN, AuthError, KeyRecord, KeyStore, Scopes
from ray_app.accounting.limits import RateLimited, RateWindows
from ray_app.serve.errors import APIError, AuthenticationError, PermissionDeniedError, RateLimitError, error_response
from ray_app.serve.middleware import app_path

__all__ = ["Auth", "Caller", "KeyAuth", "TOKEN_ROUTES", "caller_of"]

logger = logging.getLogger("ray_app.gateway")

# Routes whose cost is tokens: only these are charged a token estimate against the key's tpm up front.
TOKEN_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
# What anyone may read without a key: probes, the API's own description, the console's static files.
# Everything else needs a key in keys mode: a path this list does not name is closed, not open.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
PUBLIC_PREFIXES = ("/ui",)
_STATE_KEY = "ray_app_caller"


@dataclass(frozen=True)
class Caller:
    key: KeyRecord | None = None
    scopes: Scopes = ANONYMOUS_OPEN
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased request headers, without authorization
    estimated_tokens: int = 0  # what the rate limiter was charged up front

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key else None

    @property
    def confidential(self) -> bool:
        return bool(self.key and self.key.confidential)

    def require_admin(self, what: str) -> None:
        if not self.scopes.admin:
            raise PermissionDeniedError(f"{what} needs an admin key (`ray-app keys create NAME --admin`)")

    def require_fine_tune(self) -> None:
        if not (self.scopes.fine_tune or self.scopes.admin):
            raise PermissionDeniedError("fine-tuning needs a key with the fine_tune scope "
                                        "(`ray-app keys create NAME --fine-tune`)")

    def require_read(self, collection: str) -> None:
        if not self.scopes.can_read(collection):
            raise PermissionDeniedError(f"this key may not read collection {collection!r}", param="collection")

    def require_write(self, collection: str) -> None:
        if not self.scopes.can_write(collection):
            raise PermissionDeniedError(f"this key may not write to collection {collection!r} "
                                        f"(`ray-app keys create NAME --write {collection}`)", param="collection")


OPEN_ANONYMOUS = Caller()


async def caller_of(request: Request) -> Caller:
    """The caller ``KeyAuth`` admitted (an app without it serves everyone as the open anonymous caller).
    Async so that FastAPI calls it on the event loop: a plain ``def`` dependency costs every request a
    hop to a worker thread and back (a tenth of the replica's loop in a burst of one-token requests,
    py-spy)."""
    return request.scope.get("state", {}).get(_STATE_KEY, OPEN_ANONYMOUS)


class Auth:
    def __init__(self, config: AuthConfig, keys: KeyStore, windows: RateWindows):
        self.config, self.keys, self.windows = config, keys, windows

    @property
    def mode(self) -> AuthMode:
        return self.config.mode

    def describe(self) -> str:
        active = self.keys.active()
        if self.mode == "keys":
            return f"auth mode keys: every /v1 request needs one of {active} active key(s)"
        return f"auth mode open: anonymous callers have full access ({active} active key(s) identify their callers)"

    def authenticate(self, authorization: str | None) -> KeyRecord | None:
        """The caller's key, None for an anonymous caller of an open server; raises ``AuthenticationError``."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token.startswith("rk-"):
            if self.mode == "keys":
                raise AuthenticationError("this server requires an API key: send `Authorization: Bearer rk-...` "
                                          "(an admin creates one with `ray-app keys create`)")
            return None
        try:
            return self.keys.authenticate(token)
        except AuthError as e:
            raise AuthenticationError(str(e)) from None

    def caller(self, headers: dict[str, str], path: str) -> Caller:
        key = self.authenticate(headers.get("authorization"))
        rest = {k: v for k, v in headers.items() if k != "authorization"}
        if key is None:
            return Caller(None, ANONYMOUS_OPEN, rest)
        # The body is not read yet; its size bounds the prompt, and the window is corrected with the
        # real count when the request completes.
        estimated = int(int(headers.get("content-length") or 0) / 4) if path in TOKEN_ROUTES else 0
        try:
            self.windows.admit(key, estimated)
        except RateLimited as e:
            raise RateLimitError(str(e), code=f"rate_limit_exceeded_{e.limit}",
                                 headers={"retry-after": str(max(1, math.ceil(e.retry_after_s)))}) from None
        return Caller(key, key.scopes, rest, estimated)


class KeyAuth:
    """ASGI middleware: admit every ``/v1`` request on its headers and put the ``Caller`` in its scope."""

    def __init__(self, app: ASGIApp, auth: Auth):
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = app_path(scope)
        # CORS preflights carry no credentials by design; the CORS middleware outside answers them
        if (scope["type"] != "http" or scope.get("method") == "OPTIONS" or path in PUBLIC_PATHS
                or path.startswith(PUBLIC_PREFIXES)):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            # On the event loop: an anonymous caller needs no lookup, and a key is one read by primary key
            # of the WAL-mode key store (readers never wait for its writers), tens of microseconds: less
            # than the hop to a worker thread and back, which on a loop busy with streams also waits for
            # the GIL.
            caller = self.auth.caller(headers, path)
        except APIError as error:
            return await error_response(error)(scope, receive, send)
        scope.setdefault("state", {})[_STATE_KEY] = caller
        await self.app(scope, receive, send)
