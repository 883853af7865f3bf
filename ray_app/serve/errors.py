"""Typed API errors and the one place that turns them into OpenAI's error format.

Inside the gateway, code raises an ``APIError`` subclass carrying the offending parameter; the
handlers installed by ``install_error_handlers`` turn it (and FastAPI's validation errors, and
failures of the deployments behind the gateway) into
``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from vllm.exceptions import VLLMClientError, VLLMNotFoundError

logger = logging.getLogger("ray_app.gateway")


class APIError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):
        # Errors raised inside a deployment (the router) cross a DeploymentHandle pickled; keep every
        # field, including a per-instance status or code, instead of re-running __init__ with args.
        return _rebuild_api_error, (type(self), self.__dict__)


def _rebuild_api_error(cls: type[APIError], state: dict[str, Any]) -> APIError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, known: list[str], param: str = "model", detail: str | None = None):
        super().__init__(
            f"The model {model!r} does not exist"
            + (f": {detail}" if detail else f". Known models: {', '.join(sorted(known)) or '(none)'}"),
            param=param,
        )


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ConflictError(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class EngineUnavailableError(APIError):
    status_code = 503
    type = "service_unavailable"
    code = "engine_unavailable"


class AuthenticationError(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(APIError):
    """The key is valid but its scopes do not cover this (OpenAI's 403)."""

    status_code = 403
    type = "invalid_request_error"
    code = "permission_denied"


class BudgetExceededError(APIError):
    status_code = 402
    type = "insufficient_quota"
    code = "budget_exceeded"


class RateLimitError(APIError):
    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


class UpstreamTimeoutError(APIError):
    status_code = 504
    type = "timeout_error"
    code = "timeout"


# vLLM's validation names the input it measured when a prompt does not fit the context
_CONTEXT_PARAMS = frozenset({"input_tokens", "input_text"})


def from_engine_error(status_code: int, message: str, err_type: str | None = None,
                      param: str | None = None) -> APIError:
    """An ``APIError`` for an error the engine (vLLM) reported in its own ErrorResponse."""
    if status_code == 400 and param in _CONTEXT_PARAMS:
        return ContextLengthExceededError(message, param="messages")
    cls = {400: InvalidRequestError, 404: NotFoundError, 413: RequestTooLargeError,
           503: EngineUnavailableError}.get(status_code)
    if cls is None:
        error = APIError(message, param=param)
        error.status_code = status_code if 400 <= status_code < 600 else 500
        error.type = err_type or error.type
        return error
    return cls(message, param=param)


def from_deployment_failure(exc: BaseException, model: str) -> APIError:
    """An ``APIError`` for an exception raised by a call through a DeploymentHandle."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    exc = root_cause(exc)  # Ray's wrapper of a replica's exception subclasses it: keep the exception itself
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return EngineUnavailableError(f"{model!r} is overloaded (queue full); retry later",
                                      headers={"retry-after": "1"})
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)):
        return EngineUnavailableError(f"{model!r} is unavailable: its replica is not running ({type(exc).__name__})",
                                      headers={"retry-after": "5"})
    return internal_error(exc, f"while serving {model!r}")


def internal_error(exc: BaseException, where: str = "") -> APIError:
    """A 500 that says nothing of the exception (its text may hold another service's internals or a
    prompt): the log has it, under the id the client is given."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s %s: %s: %s", error_id, where, type(exc).__name__, exc,
                 exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(f"internal error{' ' + where if where else ''} (error id {error_id}); see the server log",
                    code="internal_error")


def from_routing_error(exc: Exception) -> APIError:
    """The client-facing error for a routing decision that found no target."""
    from ray_app.router.policy import (
        ContextTooLongError,
        OverCostCeilingError,
        PrivacyError,
        RoutingError,
        ToolsNotSupportedError,
        UnknownRouteError,
    )

    if isinstance(exc, UnknownRouteError):
        return ModelNotFoundError(str(exc).splitlines()[0].removeprefix("unknown route ").strip("'"), [])
    if isinstance(exc, PrivacyError):
        return EngineUnavailableError(str(exc), code="no_local_target", headers={"retry-after": "5"})
    if isinstance(exc, ContextTooLongError):
        return ContextLengthExceededError(str(exc), param="messages")
    if isinstance(exc, ToolsNotSupportedError):
        return InvalidRequestError(str(exc), param="tools", code="tools_not_configured")
    if isinstance(exc, OverCostCeilingError):
        return BudgetExceededError(str(exc), code="cost_ceiling_exceeded")
    if isinstance(exc, RoutingError):
        return EngineUnavailableError(str(exc), code="no_target_available", headers={"retry-after": "5"})
    raise exc


class UnsupportedMediaError(APIError):
    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_type"


def root_cause(exc: BaseException) -> BaseException:
    """The exception a deployment raised, without Ray's RayTaskError wrapper."""
    return getattr(exc, "cause", None) or exc


def from_document_error(exc: BaseException, what: str) -> APIError:
    """An ``APIError`` for a failure of the document side (store, parser, OCR)."""
    from ray_app.documents.parse import RefusedFile
    from ray_app.documents.store import CollectionExists, CollectionNotFound, StoreError

    cause = root_cause(exc)
    if isinstance(cause, CollectionNotFound):
        return NotFoundError(str(cause), param="collection", code="collection_not_found")
    if isinstance(cause, CollectionExists):
        return ConflictError(str(cause), param="name", code="collection_exists")
    if isinstance(cause, RefusedFile):
        cls = {"too_large": RequestTooLargeError, "too_many_pages": RequestTooLargeError,
               "unsupported_type": UnsupportedMediaError}.get(cause.code, InvalidRequestError)
        return cls(cause.message, param="file", code=cause.code)
    if isinstance(cause, (StoreError, ValueError)):
        return InvalidRequestError(str(cause))
    return from_deployment_failure(exc, what)


def error_response(error: APIError) -> JSONResponse:
    from ray_app.metrics import record_error

    record_error(error.status_code, error.code)
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def _validation_param(loc: tuple) -> str | None:
    # a union's members appear in the location by their type's name ("constrained-str", "list[str]"):
    # the parameter is the fields and indices only
    parts = [str(p) for p in loc if p not in ("body", "query", "path") and (isinstance(p, int) or p.isidentifier())]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status_code >= 500:
            logger.warning("%s: %s", type(exc).__name__, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        messages = "; ".join(f"{_validation_param(e['loc']) or 'body'}: {e['msg']}" for e in errors)
        return error_response(InvalidRequestError(messages, param=_validation_param(first["loc"])))

    @app.exception_handler(VLLMClientError)
    async def _vllm_client_error(_: Request, exc: VLLMClientError) -> JSONResponse:
        # vLLM's request models validate some fields by raising this from inside pydantic
        if isinstance(exc, VLLMNotFoundError):
            return error_response(NotFoundError(str(exc)))
        return error_response(InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = from_engine_error(exc.status_code, str(exc.detail))
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(internal_error(exc, "in the gateway"))
