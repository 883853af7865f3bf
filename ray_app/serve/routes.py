"""The OpenAI-compatible HTTP routes: glue between FastAPI and ``OpenAIService``.

``build_api`` returns a plain FastAPI app, so the routes, the error format and the body limit are
tested in-process; the Serve ``Gateway`` deployment only hosts what this returns.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response, StreamingResponse

from ray_app.documents.config import Sensitivity
from ray_app.documents.retrieval import RetrieveRequest
from ray_app.serve.config import GatewayConfig
from ray_app.serve.auth import CALLER, Auth, KeyAuth
from ray_app.serve.errors import BodySizeLimit, InvalidRequestError, NotFoundError, install_error_handlers
from ray_app.serve.openai_api import OpenAIService, WithHeaders
from ray_app.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)


@dataclass
class HealthReport:
    ready: bool
    deployments: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    targets: dict[str, dict] | None = None  # the router's targets: deployed or why not, breaker, error rate


def _respond(result: dict | AsyncIterator[str] | WithHeaders) -> Response:
    headers = {}
    if isinstance(result, WithHeaders):
        result, headers = result.result, result.headers
    if isinstance(result, dict):
        return JSONResponse(result, headers=headers)
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"} | headers)


def build_api(service: OpenAIService, config: GatewayConfig, health: Callable[[], Awaitable[HealthReport]],
              route_limits: dict[str, int] | None = None,
              system_status: Callable[[], Awaitable[dict]] | None = None, auth: Auth | None = None) -> FastAPI:
    """The app; ``route_limits`` gives path prefixes (uploads, OCR) body limits of their own;
    ``auth`` (the router's keys) guards every ``/v1`` route and serves ``/v1/usage``."""
    app = FastAPI(title="ray_app", description="OpenAI-compatible API over Ray Serve", version="1")
    install_error_handlers(app)
    if config.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_allow_origins,
                           allow_methods=["*"], allow_headers=["*"])
    if auth is not None:
        app.add_middleware(KeyAuth, auth=auth)
    # Added last so it runs first: oversized bodies are refused before anything parses them.
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes, route_limits=route_limits)
    documents = service.documents

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return await service.list_models()

    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def get_model(model: str) -> ModelCard:
        return await service.get_model(model)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return _respond(await service.chat(body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return _respond(await service.completions(body))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest) -> EmbeddingResponse:
        return await service.embeddings(body)

    @app.post("/v1/retrieve")
    async def retrieve(body: RetrieveRequest) -> JSONResponse:
        return JSONResponse(await documents.retrieve(body))

    @app.post("/v1/ocr")
    async def ocr(file: UploadFile = File(description="An image (PNG, JPEG, TIFF, ...) or a PDF.")) -> JSONResponse:
        return JSONResponse(await documents.ocr(file.filename or "upload", await file.read()))

    @app.get("/v1/collections")
    async def collections() -> JSONResponse:
        return JSONResponse(await documents.collections())

    @app.post("/v1/collections/{collection}/documents")
    async def upload(collection: str, file: UploadFile = File(description="A document to index."),
                     sensitivity: Sensitivity | None = Form(None)) -> JSONResponse:
        result = await documents.upload(collection, file.filename or "upload", await file.read(), sensitivity)
        return JSONResponse(result, status_code=201 if result["status"] == "indexed" else 200)

    @app.delete("/v1/collections/{collection}/documents/{doc_id}")
    async def delete_document(collection: str, doc_id: str) -> JSONResponse:
        return JSONResponse(await documents.delete_document(collection, doc_id))

    @app.get("/v1/system/status")
    async def status() -> JSONResponse:
        if system_status is None:
            raise NotFoundError("system status is served by the Serve gateway only")
        return JSONResponse(await system_status())

    @app.get("/v1/usage")
    async def usage(since: str | None = None, until: str | None = None, group_by: str = "key,model,day",
                    key: str | None = None) -> JSONResponse:
        """Spend per key, model and day (UTC). A caller with a key sees its own spend only."""
        if auth is None:
            raise NotFoundError("spend tracking is off: this app has no `router` configured")
        caller = CALLER.get()
        if caller.key is not None:
            if key not in (None, caller.key.key_id):
                raise InvalidRequestError("a key can only read its own usage", param="key")
            key = caller.key.key_id
        groups = [g.strip() for g in group_by.split(",") if g.strip()]
        try:
            bounds = [None if d is None else datetime.strptime(d, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
                      for d in (since, until)]
        except ValueError:
            raise InvalidRequestError("since and until are UTC days, YYYY-MM-DD", param="since") from None
        if until is not None:
            bounds[1] += 86400  # inclusive: the whole last day
        try:
            rows = await asyncio.to_thread(auth.ledger.usage, key, bounds[0], bounds[1], groups)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="group_by") from None
        total = {f: sum(r[f] for r in rows) for f in ("requests", "prompt_tokens", "completion_tokens", "cost_usd")}
        return JSONResponse({"object": "list", "data": rows, "total": total})

    @app.get("/health")
    async def health_check() -> JSONResponse:
        report = await health()
        return JSONResponse(
            {"status": "ok" if report.ready else "unavailable", "deployments": report.deployments,
             "detail": report.detail} | ({"targets": report.targets} if report.targets is not None else {}),
            status_code=200 if report.ready else 503,
        )

    return app
