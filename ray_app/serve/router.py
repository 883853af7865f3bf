"""The ``Router`` deployment: a thin Serve host for ``RouterService`` between the gateway and the models.

Local targets are reached through the LLM deployments' handles (the same ``OpenAIService`` path the
gateway uses for a named model, so timeouts and engine errors behave alike); cloud targets through
their SDK clients. A cloud target whose credentials are missing is not deployed: the router reports
why in ``/health`` and routes around it, so the offline defaults work with only local models.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from ray.serve.handle import DeploymentHandle

from ray_app.router.config import RouterConfig, Target
from ray_app.router.ledger import Ledger
from ray_app.router.policy import ContextTooLongError, PrivacyError, RoutingError, UnknownRouteError
from ray_app.router.providers import LocalProvider, Provider, ProviderError, make_provider
from ray_app.router.service import AllTargetsFailed, RouteInfo, RouterService
from ray_app.serve.errors import (
    APIError,
    ContextLengthExceededError,
    EngineUnavailableError,
    ModelNotFoundError,
    from_engine_error,
)
from ray_app.serve.openai_api import DONE, OpenAIService, log_usage
from ray_app.serve.protocol import ChatCompletionRequest, ModelCard


def _missing_credentials(target: Target) -> str | None:
    if target.kind == "bedrock" and not target.endpoint_url:
        import boto3

        if boto3.Session().get_credentials() is None:
            return "no AWS credentials (environment, shared config or instance role)"
    return None


def to_api_error(exc: Exception) -> APIError:
    """The client-facing error for a routing or provider failure."""
    if isinstance(exc, UnknownRouteError):
        return ModelNotFoundError(str(exc).splitlines()[0].removeprefix("unknown route ").strip("'"), [])
    if isinstance(exc, PrivacyError):
        return EngineUnavailableError(str(exc), code="no_local_target", headers={"retry-after": "5"})
    if isinstance(exc, ContextTooLongError):
        return ContextLengthExceededError(str(exc), param="messages")
    if isinstance(exc, (RoutingError, AllTargetsFailed)):
        return EngineUnavailableError(str(exc), code="no_target_available", headers={"retry-after": "5"})
    if isinstance(exc, ProviderError):  # a client error a target reported (the request itself is bad)
        return from_engine_error(exc.status or 400, str(exc))
    raise exc


class RouterServer:
    def __init__(self, config: RouterConfig, llms: dict[str, DeploymentHandle], llm_replicas: dict[str, int]):
        from ray_app.serve.gateway import HandleLLM

        local_timeout = max((t.timeout_s for t in config.targets if t.kind == "local"), default=600.0)
        self._local = OpenAIService(
            llms={name: HandleLLM(h) for name, h in llms.items()}, embedders={},
            cards={name: ModelCard(id=name, kind="llm") for name in llms}, timeout_s=local_timeout,
            on_usage=log_usage)  # metrics and logs; the router's ledger accounts for the spend
        providers: dict[str, Provider] = {}
        unavailable: dict[str, str] = {}
        for target in config.targets:
            if target.kind == "local":
                providers[target.name] = LocalProvider(target, partial(self._local_chat, target.name),
                                                       partial(self._local_stream, target.name))
                continue
            try:
                if (why := _missing_credentials(target)) is not None:
                    raise ValueError(why)
                providers[target.name] = make_provider(target, os.environ)
            except ValueError as e:
                unavailable[target.name] = str(e)
        self.service = RouterService(
            config, providers, Ledger(config.ledger_path()), unavailable=unavailable,
            replicas={t.name: llm_replicas.get(t.model, 1) for t in config.targets if t.kind == "local"})

    # -- local targets -------------------------------------------------------------------------

    async def _local_chat(self, target: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._local.chat(ChatCompletionRequest.model_validate(request | {"stream": False}))
        except APIError as e:
            raise ProviderError(target, e.message, e.status_code, e.status_code in (429, 503, 504)) from None

    async def _local_stream(self, target: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        body = request | {"stream": True, "stream_options": {"include_usage": True}}
        try:
            events = await self._local.chat(ChatCompletionRequest.model_validate(body))
        except APIError as e:
            raise ProviderError(target, e.message, e.status_code, e.status_code in (429, 503, 504)) from None
        try:
            async for text in events:
                for event in text.split("\n\n"):
                    if not event.startswith("data: ") or event == DONE.strip():
                        continue
                    data = json.loads(event[len("data: "):])
                    if "error" in data:
                        raise ProviderError(target, data["error"].get("message", "engine error"))
                    yield data
        finally:
            await events.aclose()  # stopped early (client gone): the engine aborts the request

    # -- what the gateway calls ----------------------------------------------------------------

    def _features(self, request: dict[str, Any], caller: dict[str, Any]):
        return self.service.features(request, headers=caller.get("headers"),
                                     confidential_key=caller.get("confidential", False),
                                     retrieved_sensitivities=caller.get("retrieved", ()))

    async def chat(self, request: dict[str, Any], caller: dict[str, Any]) -> tuple[dict[str, Any], RouteInfo]:
        try:
            routed = await self.service.chat(request, features=self._features(request, caller),
                                             key_id=caller.get("key_id"))
        except Exception as e:
            raise to_api_error(e) from None
        return routed.body, routed.info

    async def chat_stream(self, request: dict[str, Any], caller: dict[str, Any]) -> AsyncIterator[Any]:
        """The ``RouteInfo`` first, then SSE text, then the final ``RouteInfo`` with the cost."""
        client_wants_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        try:
            async for event in self.service.stream(request, features=self._features(request, caller),
                                                   key_id=caller.get("key_id")):
                if "route" in event or "done" in event:
                    yield event.get("route") or event["done"]
                elif "error" in event:
                    yield f"data: {json.dumps({'error': {'message': event['error']['message'], 'type': 'server_error', 'param': None, 'code': 'upstream_error'}})}\n\n"
                elif event.get("usage") and not event.get("choices"):
                    if client_wants_usage:
                        yield f"data: {json.dumps(event)}\n\n"
                else:
                    yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:
            raise to_api_error(e) from None

    def routes(self) -> list[str]:
        return self.service.routes

    def health(self) -> dict[str, dict[str, Any]]:
        return self.service.health_report()
