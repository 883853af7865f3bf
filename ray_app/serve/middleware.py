"""The gateway's ASGI plumbing that is not about keys: the body-size limit, and the path a request has
inside the application (which the key middleware in ``auth`` reads too)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ray_app.serve.errors import RequestTooLargeError, error_response


def app_path(scope: Scope) -> str:
    """The path inside the application: Serve mounts an app under its route prefix (``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over the limit with 413, before they are parsed.

    ``max_bytes`` is the default; ``route_limits`` maps path prefixes (uploads, OCR) to their own limits.
    Checks Content-Length up front, and for chunked bodies reads (at most the limit + 1 bytes) before
    the app sees anything, then replays the body: the gateway parses every body in full anyway, so
    buffering it here costs nothing extra.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, route_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = sorted((route_limits or {}).items(), key=lambda kv: -len(kv[0]))

    def limit_for(self, path: str) -> int:
        # whole path segments: /v1/collections covers /v1/collections/x/documents, not /v1/collectionsX
        return next((limit for prefix, limit in self.route_limits
                     if path == prefix or path.startswith(prefix.rstrip("/") + "/")), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(app_path(scope))
        too_large = RequestTooLargeError(f"request body exceeds the limit of {limit} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await error_response(too_large)(scope, receive, send)
                return

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await error_response(too_large)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
