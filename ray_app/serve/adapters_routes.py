"""``/v1/adapters``: the registry's adapter lines as the console shows them, and promotion and rollback
(admin keys only), the same operations as ``ray-app adapters promote`` / ``rollback``."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Callable

from fastapi import APIRouter, Depends
from pydantic import Field
from starlette.responses import JSONResponse

from ray_app.schema import Strict
from ray_app.serve.auth import Caller, caller_of
from ray_app.serve.errors import ConflictError, NotFoundError

CallerDep = Annotated[Caller, Depends(caller_of)]
_SHOWN_TAGS = ("parity", "adapter_task_score", "base_task_score", "base_model", "base_serve_name", "dataset_sha256",
               "eval_loss", "perplexity")


class Promote(Strict):
    version: int = Field(ge=1)
    force: bool = Field(False, description="Promote even if its train->serve parity check did not pass.")


def _line(registry, name: str) -> dict[str, Any]:
    versions = registry.versions(name)
    champion = next((v.version for v in versions if "champion" in v.aliases), None)
    return {"object": "adapter_line", "name": name, "base_model": versions[-1].base_model if versions else None,
            "champion": champion,
            "versions": [{"version": v.version, "aliases": list(v.aliases),
                          "tags": {k: v.tags[k] for k in _SHOWN_TAGS if k in v.tags}} for v in versions]}


def adapters_router(registries: list[Callable[[], Any]]) -> APIRouter:
    """``registries``: openers of the distinct registries the served models' adapters come from
    (``AdapterRegistry`` imports MLflow: opened at the first request, not at start-up)."""
    router = APIRouter()

    def find(name: str):
        for opened in registries:
            registry = opened()
            if name in registry.lines():
                return registry
        raise NotFoundError(f"no adapter line {name!r} in the registry", param="name", code="adapter_not_found")

    def listing() -> list[dict]:
        return [_line(r, name) for r in (opened() for opened in registries) for name in r.lines()]

    @router.get("/v1/adapters")
    async def adapters(caller: CallerDep) -> JSONResponse:
        return JSONResponse({"object": "list", "data": await asyncio.to_thread(listing)})

    def promote(name: str, body: Promote) -> dict:
        from ray_app.training.registry import AdapterNotFound, PromotionRefused

        registry = find(name)
        try:
            registry.promote(name, body.version, force=body.force)
        except AdapterNotFound as e:
            raise NotFoundError(str(e), param="version", code="adapter_not_found") from None
        except PromotionRefused as e:
            raise ConflictError(str(e), param="version", code="promotion_refused") from None
        return _line(registry, name)

    def rollback(name: str) -> dict:
        from ray_app.training.registry import PromotionRefused

        registry = find(name)
        try:
            registry.rollback(name)
        except PromotionRefused as e:
            raise ConflictError(str(e), code="rollback_refused") from None
        return _line(registry, name)

    @router.post("/v1/adapters/{name}/promote")
    async def promote_route(name: str, body: Promote, caller: CallerDep) -> JSONResponse:
        caller.require_admin("promoting an adapter")
        return JSONResponse(await asyncio.to_thread(promote, name, body))

    @router.post("/v1/adapters/{name}/rollback")
    async def rollback_route(name: str, caller: CallerDep) -> JSONResponse:
        caller.require_admin("rolling an adapter back")
        return JSONResponse(await asyncio.to_thread(rollback, name))

    return router
