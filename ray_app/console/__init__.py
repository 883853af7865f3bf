"""The web console: static assets served by the gateway itself at ``/ui``.

Same origin as the API, so the page calls ``/v1/...`` with the key the user typed (kept in the
browser tab's session storage) and every key, scope, limit and error applies unchanged. The assets
are plain files in ``static/``: Preact + htm (components without a build step) and uPlot (charts),
vendored by ``scripts/vendor_console.sh``; nothing is fetched from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC = Path(__file__).parent / "static"

# no inline script, no other origin: an injected string in a document or a model's answer cannot run
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class ConsoleFiles(StaticFiles):
    """The assets, with the console's security headers; revalidated on each load (ETags), so an
    upgraded server never runs with yesterday's scripts."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(b"content-security-policy", CSP.encode()),
                                       (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                                       (b"cache-control", b"no-cache")]
            await send(message)

        await super().__call__(scope, receive, with_headers)


def mount_console(app, path: str = "/ui") -> None:
    @app.get(path, include_in_schema=False)
    async def console_root(request: Request) -> RedirectResponse:  # relative asset URLs need the slash
        return RedirectResponse(url=request.url.path + "/" + (f"?{request.url.query}" if request.url.query else ""))

    app.mount(path, ConsoleFiles(directory=STATIC, html=True), name="console")
