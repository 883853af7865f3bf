"""The OpenAI-compatible HTTP routes: glue between FastAPI and ``OpenAIService``.

``build_api`` returns a plain FastAPI app, so the routes, the error format, keys and the body limit
are tested in-process; the Serve ``Gateway`` deployment only hosts what this returns.

Middleware order (outermost first): CORS (answers preflights, adds its headers to every answer,
errors included), ``KeyAuth`` (on the headers alone: no body is read for a caller that is refused),
``BodySizeLimit``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Annotated, AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import Field, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from ray_app.accounting.ledger import Ledger
from ray_app.fine_tuning.jobs import FineTuningService
from ray_app.accounting.usage import UsageQuery
from ray_app.documents.retrieval import RetrieveRequest
from ray_app.schema import Strict
from ray_app.sensitivity import Sensitivity
from ray_app.serve.auth import Auth, Caller, KeyAuth, caller_of
from ray_app.serve.config import GatewayConfig
from ray_app.serve.errors import InvalidRequestError, NotFoundError, install_error_handlers
from ray_app.serve.middleware import BodySizeLimit
from ray_app.serve import public
from ray_app.serve.openai_api import OpenAIService, WithHeaders
from ray_app.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)

CallerDep = Annotated[Caller, Depends(caller_of)]
# chat and text completions answer JSON, or server-sent events when the request says `stream: true`
_STREAMING = {200: {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
                    "description": "The completion, or with `stream: true` its chunks as server-sent events."}}


def _json_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _json_number(text: str) -> int | float:
    # JSON Schema's integer includes 5.0; pydantic's strict int does not: hand it an int
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2 ** 63 else value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def _engine_request(engine, request: Request):
    """The body checked against the public schema as the schema reads, strictly (``"1"`` is not a
    number, nested objects included: FastAPI's own body parsing is lax), then built as vLLM's
    request; what either refuses is a 400."""
    try:
        data = json.loads(await request.body(), parse_float=_json_number, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, bad UTF-8, NaN
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"invalid JSON: {e}",
                                       "input": None}]) from None
    try:
        return engine.from_client(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


@dataclass
class HealthReport:
    ready: bool
    deployments: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    targets: dict[str, dict] | None = None  # the router's targets: deployed or why not, breaker, error rate


class CollectionCreate(Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    default_sensitivity: Sensitivity | None = Field(
        None, description="Label of uploads that name none; default: the server's `knowledge.default_sensitivity`.")
    embedder: str | None = Field(None, description="Must be the knowledge base's embedder (the default).")


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
              system_status: Callable[[], Awaitable[dict]] | None = None, auth: Auth | None = None,
              ledger: Ledger | None = None, fine_tuning: FineTuningService | None = None,
              adapter_registries: list | None = None) -> FastAPI:
    """The app; ``route_limits`` gives path prefixes (uploads, OCR) body limits of their own; ``auth``
    admits callers (none: everyone is the open anonymous caller); ``ledger`` serves ``/v1/usage``;
    ``adapter_registries`` (the served models' adapter registries) serve ``/v1/adapters``."""
    app = FastAPI(title="ray_app", description="OpenAI-compatible API over Ray Serve", version="1")
    install_error_handlers(app)
    # add_middleware puts each one outside the ones added before it
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes, route_limits=route_limits)
    if auth is not None:
        app.add_middleware(KeyAuth, auth=auth)
    if config.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_allow_origins,
                           allow_methods=["*"], allow_headers=["*"])
    documents = service.documents
    if fine_tuning is not None:
        from ray_app.serve.fine_tuning_routes import fine_tuning_router

        app.include_router(fine_tuning_router(fine_tuning))
    if adapter_registries:
        from ray_app.serve.adapters_routes import adapters_router

        app.include_router(adapters_router(adapter_registries))
    if config.console:
        from ray_app.console import mount_console

        mount_console(app, "/ui")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return await service.list_models()

    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def get_model(model: str) -> ModelCard:
        return await service.get_model(model)

    @app.post("/v1/chat/completions", responses=_STREAMING, openapi_extra=_json_body(public.ChatCompletionRequest))
    async def chat_completions(request: Request, caller: CallerDep) -> Response:
        return _respond(await service.chat(await _engine_request(ChatCompletionRequest, request), caller))

    @app.post("/v1/completions", responses=_STREAMING, openapi_extra=_json_body(public.CompletionRequest))
    async def completions(request: Request, caller: CallerDep) -> Response:
        return _respond(await service.completions(await _engine_request(CompletionRequest, request), caller))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, caller: CallerDep) -> Response:
        return _respond(await service.embeddings(body, caller))

    @app.post("/v1/retrieve")
    async def retrieve(body: RetrieveRequest, caller: CallerDep) -> JSONResponse:
        return JSONResponse(await documents.retrieve(body, caller))

    @app.post("/v1/ocr")
    async def ocr(file: UploadFile = File(description="An image (PNG, JPEG, TIFF, ...) or a PDF.")) -> JSONResponse:
        return JSONResponse(await documents.ocr(file.filename or "upload", await file.read()))

    @app.get("/v1/collections")
    async def collections(caller: CallerDep) -> JSONResponse:
        return JSONResponse(await documents.collections(caller))

    @app.post("/v1/collections", status_code=201)
    async def create_collection(body: CollectionCreate, caller: CallerDep) -> JSONResponse:
        return JSONResponse(await documents.create_collection(body.name, body.default_sensitivity, caller,
                                                              body.embedder), status_code=201)

    @app.delete("/v1/collections/{collection}")
    async def drop_collection(collection: str, caller: CallerDep) -> JSONResponse:
        return JSONResponse(await documents.drop_collection(collection, caller))

    @app.post("/v1/collections/{collection}/documents")
    async def upload(collection: str, caller: CallerDep, file: UploadFile = File(description="A document to index."),
                     sensitivity: Sensitivity | None = Form(None)) -> JSONResponse:
        result = await documents.upload(collection, file.filename or "upload", await file.read(), sensitivity, caller)
        return JSONResponse(result, status_code=201 if result["status"] == "indexed" else 200)

    @app.get("/v1/collections/{collection}/documents")
    async def documents_list(collection: str, caller: CallerDep, limit: int = Query(100, ge=1, le=1000),
                             after: str | None = Query(None, max_length=128)) -> JSONResponse:
        return JSONResponse(await documents.documents(collection, caller, limit, after))

    @app.delete("/v1/collections/{collection}/documents/{doc_id}")
    async def delete_document(collection: str, doc_id: str, caller: CallerDep) -> JSONResponse:
        return JSONResponse(await documents.delete_document(collection, doc_id, caller))

    @app.get("/v1/system/status")
    async def status(caller: CallerDep) -> JSONResponse:
        caller.require_admin("the cluster's status")
        if system_status is None:
            raise NotFoundError("system status is served by the Serve gateway only")
        return JSONResponse(await system_status())

    @app.get("/v1/usage")
    async def usage(caller: CallerDep, since: str | None = None, until: str | None = None,
                    group_by: str = "key,model,day", key: str | None = None) -> JSONResponse:
        """Spend per key, model and day (UTC). A key sees its own spend; an admin key sees every key's."""
        if ledger is None:
            raise NotFoundError("spend tracking is off on this server")
        if caller.key is not None and not caller.scopes.admin:
            if key not in (None, caller.key.key_id):
                raise InvalidRequestError("a key can only read its own usage", param="key")
            key = caller.key.key_id
        try:
            query = UsageQuery.parse(since, until, group_by, key)
        except ValueError as e:
            raise InvalidRequestError(str(e), param=getattr(e, "param", None)) from None
        return JSONResponse(await asyncio.to_thread(query.run, ledger))

    @app.get("/health")
    async def health_check() -> JSONResponse:
        report = await health()
        body = {"status": "ok" if report.ready else "unavailable", "deployments": report.deployments,
                "detail": report.detail, "auth": auth.mode if auth is not None else "open"}
        if report.targets is not None:
            body["targets"] = report.targets
        return JSONResponse(body, status_code=200 if report.ready else 503)

    app.openapi = lambda: app.openapi_schema or _openapi(app, service.recorder.config.max_n)
    return app


class ErrorBody(Strict):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(Strict):
    """Every error, in OpenAI's format."""

    error: ErrorBody


def _openapi(app: FastAPI, max_n: int) -> dict:
    """FastAPI's schema, saying what this API answers: invalid input is a 400 in OpenAI's error format
    (FastAPI would say 422 with its own shape), every other error too, by status; ``n`` up to this
    server's limit (a key's or a route's own caps, where set, are lower)."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    # the error object, and the bodies the routes validate themselves
    for model in (ErrorResponse, public.ChatCompletionRequest, public.CompletionRequest):
        body = components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components |= body.pop("$defs", {})
        if n := body["properties"].get("n"):
            next(s for s in n.get("anyOf", [n]) if s.get("type") == "integer")["maximum"] = max_n
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None or "requestBody" in operation:
                responses["400"] = {"description": "Invalid request", **error}
            responses["default"] = {"description": "An error (401 key, 404 not found, 413 too large, 429 rate or "
                                                   "budget, 503 unavailable, ...)", **error}
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = schema
    return schema
