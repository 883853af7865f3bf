"""The serving logic behind the OpenAI routes: a plain class, tested without Ray.

``OpenAIService`` resolves the requested model, calls its backend (in production a Serve
DeploymentHandle to a ``ray.serve.llm`` replica or to the embedder; in unit tests a fake that emits
the same objects and server-sent-event strings), turns engine errors into typed ``APIError``s,
forwards streams, and records token usage for every request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from ray_app.embedder import Embeddings, InputTooLongError
from ray_app.serve.documents_api import DocumentsService
from ray_app.serve.errors import (
    APIError,
    ContextLengthExceededError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    UpstreamTimeoutError,
    from_deployment_failure,
    from_engine_error,
    root_cause,
    sse_error,
)
from ray_app.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EngineErrorResponse,
    ModelCard,
    ModelList,
    StreamOptions,
    Usage,
)

logger = logging.getLogger("ray_app.gateway")

DONE = "data: [DONE]\n\n"


class LLMStream(Protocol):
    """What a backend returns for one request: an async iterator that can be cancelled.

    Items are what ``ray.serve.llm``'s LLMServer yields: a response object (non-streaming), an
    ErrorResponse, or lists of server-sent-event strings ``"data: {...}\\n\\n"`` (streaming).
    """

    def __aiter__(self) -> AsyncIterator[Any]: ...
    async def __anext__(self) -> Any: ...
    def cancel(self) -> None: ...


class LLMBackend(Protocol):
    def chat(self, request: ChatCompletionRequest) -> LLMStream: ...
    def completions(self, request: CompletionRequest) -> LLMStream: ...


class AdapterCatalog(Protocol):
    """LoRA adapters of one base model (``ray_app.serve.adapters.AdapterCatalog``)."""

    async def aresolve(self, ref: str) -> Any: ...  # -> .model_id; raises AdapterNotFoundError / AdapterBaseMismatchError
    def model_ids(self) -> list[str]: ...


class RouterBackend(Protocol):
    """The ``Router`` deployment (``ray_app.serve.router.RouterServer``) behind route names like ``auto``."""

    async def chat(self, request: dict[str, Any], caller: dict[str, Any]) -> tuple[dict[str, Any], Any]: ...
    def chat_stream(self, request: dict[str, Any], caller: dict[str, Any]) -> AsyncIterator[Any]: ...


@dataclass
class WithHeaders:
    """A response body (or SSE stream) plus headers for the HTTP layer (the router's route and cost)."""

    result: dict | AsyncIterator[str]
    headers: dict[str, str]


class EmbedderBackend(Protocol):
    async def embed(self, texts: list[str]) -> Embeddings: ...


@dataclass(frozen=True)
class UsageRecord:
    model: str
    endpoint: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ttft_seconds: float | None = None


def log_usage(record: UsageRecord) -> None:
    from ray_app.metrics import record_request

    record_request(record.model, record.endpoint, record.prompt_tokens, record.completion_tokens,
                   record.seconds, record.ttft_seconds)
    logger.info(
        "usage endpoint=%s model=%s stream=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%s total_ms=%.0f",
        record.endpoint, record.model, record.stream, record.prompt_tokens, record.completion_tokens,
        "-" if record.ttft_seconds is None else f"{record.ttft_seconds * 1000:.0f}", record.seconds * 1000,
    )


async def _always_available(model: str) -> None:
    return None


@dataclass
class OpenAIService:
    llms: dict[str, LLMBackend]
    embedders: dict[str, EmbedderBackend]
    cards: dict[str, ModelCard]
    timeout_s: float = 600.0
    on_usage: Callable[[UsageRecord], None] = log_usage
    # model -> why it cannot serve now (None when it can); the gateway answers from Serve's status
    unavailable: Callable[[str], Awaitable[str | None]] = _always_available
    documents: DocumentsService = field(default_factory=DocumentsService)
    adapters: dict[str, AdapterCatalog] = field(default_factory=dict)  # base model -> its adapters
    router: RouterBackend | None = None
    routes: frozenset[str] = frozenset()  # `model` values that go through the router
    # who is calling: key id, confidentiality, headers (the gateway reads them from ray_app.serve.auth)
    caller: Callable[[], dict[str, Any]] = dict
    on_routed: Callable[[Any], None] = lambda info: None  # a routed request finished: RouteInfo with cost
    _known: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self._known = sorted(self.cards)

    # -- models --------------------------------------------------------------------------------

    async def list_models(self) -> ModelList:
        cards = [self.cards[name] for name in self._known]
        cards += [ModelCard(id=route, kind="route") for route in sorted(self.routes)]
        for base, catalog in self.adapters.items():
            cards += [ModelCard(id=model_id, kind="adapter", parent=base, root=model_id.split(":", 1)[1])
                      for model_id in await asyncio.to_thread(catalog.model_ids)]
        return ModelList(data=cards)

    async def get_model(self, model: str) -> ModelCard:
        if model in self.cards:
            return self.cards[model]
        if model in self.routes:
            return ModelCard(id=model, kind="route")
        if ":" in model:
            _, model_id = await self._resolve_adapter(model)
            base, pinned = model_id.split(":", 1)
            return ModelCard(id=model, kind="adapter", parent=base, root=pinned)
        raise ModelNotFoundError(model, self._known)

    async def _resolve_adapter(self, model: str) -> tuple[str, str]:
        """``<base>:<adapter ref>`` -> (base, pinned model id ``<base>:<name>@<version>``)."""
        from ray_app.serve.adapters import AdapterBaseMismatchError, AdapterNotFoundError

        base, ref = model.split(":", 1)
        if base not in self.llms:
            raise ModelNotFoundError(model, self._known)
        catalog = self.adapters.get(base)
        if catalog is None:
            raise ModelNotFoundError(model, self._known, detail=f"{base!r} serves no adapters (`adapters:` in its config)")
        try:
            resolved = await catalog.aresolve(ref)
        except AdapterNotFoundError as e:
            raise ModelNotFoundError(model, self._known, detail=str(e)) from None
        except AdapterBaseMismatchError as e:
            raise InvalidRequestError(str(e), param="model") from None
        return base, resolved.model_id

    async def _resolve_llm(self, model: str | None, kind: str) -> tuple[str, str]:
        """(backend name, model id for the engine): the base itself, or a pinned adapter id on it."""
        if model is not None and ":" in model and model not in self.cards:
            base, model_id = await self._resolve_adapter(model)
            return await self._resolve(base, self.llms, kind, self.embedders, "/v1/embeddings"), model_id
        name = await self._resolve(model, self.llms, kind, self.embedders, "/v1/embeddings")
        return name, name

    async def _resolve(self, model: str | None, pool: dict, kind: str, other: dict, other_route: str) -> str:
        if model is None:
            if len(pool) != 1:
                raise InvalidRequestError(f"`model` is required; {kind} models: {', '.join(sorted(pool))}",
                                          param="model")
            model = next(iter(pool))
        if model in pool:
            if (reason := await self.unavailable(model)) is not None:
                # fail fast instead of queueing behind a replica that is not there
                raise EngineUnavailableError(f"{model!r} is unavailable: {reason}", headers={"retry-after": "5"})
            return model
        if model in other:
            raise InvalidRequestError(f"{model!r} is not a {kind} model; use {other_route}", param="model")
        raise ModelNotFoundError(model, self._known)

    # -- chat and text completions -------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str] | WithHeaders:
        if self.router is not None and request.model in self.routes:
            return await self._route(request)
        name, model_id = await self._resolve_llm(request.model, "chat")
        rag = (request.model_extra or {}).pop("rag", None)
        if rag is None:
            return await self._generate(name, model_id, request, "chat")
        # retrieval-augmented: numbered sources go into the prompt, citations come back with the answer
        request.messages, citations, _ = await self.documents.augment(list(request.messages), rag)
        return await self._generate(name, model_id, request, "chat", extra={"citations": citations})

    async def _route(self, request: ChatCompletionRequest) -> WithHeaders:
        """A chat whose ``model`` is a route: the router picks the target, falls back, and charges."""
        caller = self.caller()
        extra: dict[str, Any] = {}
        if (rag := (request.model_extra or {}).pop("rag", None)) is not None:
            request.messages, citations, passages = await self.documents.augment(list(request.messages), rag)
            # a confidential chunk in the prompt keeps the request on local targets
            caller["retrieved"] = [getattr(p, "sensitivity", None) or "internal" for p in passages]
            extra["citations"] = citations
        body = request.model_dump(mode="json", exclude_unset=True)
        try:
            if not request.stream:
                result, info = await self.router.chat(body, caller)
                self.on_routed(info)
                return WithHeaders(result | extra, info.headers())
            stream = self.router.chat_stream(body, caller)
            info = await anext(stream)
        except Exception as exc:  # errors raised in the router arrive wrapped by Ray
            raise from_deployment_failure(root_cause(exc), "router") from exc
        return WithHeaders(self._forward_routed(stream, extra), info.headers())

    async def _forward_routed(self, stream: Any, extra: dict[str, Any]) -> AsyncIterator[str]:
        finished = False
        try:
            async for item in stream:
                if not isinstance(item, str):  # the closing RouteInfo, with the cost
                    self.on_routed(item)
                    continue
                if extra and item.startswith("data: {"):
                    item = f"data: {json.dumps(json.loads(item[len('data: '):]) | extra)}\n\n"
                    extra = {}
                yield item
            finished = True
        except Exception as exc:  # the router replica died mid-stream: tell the client in-band
            finished = True
            yield sse_error(from_deployment_failure(root_cause(exc), "router"))
        finally:
            if not finished and hasattr(stream, "cancel"):
                stream.cancel()  # the client went away: the router cancels its target's request
        yield DONE

    async def completions(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        name, model_id = await self._resolve_llm(request.model, "completion")
        return await self._generate(name, model_id, request, "completions")

    async def _generate(self, name: str, model_id: str, request: Any, endpoint: str,
                        extra: dict[str, Any] | None = None) -> dict | AsyncIterator[str]:
        """Run ``request`` on backend ``name`` as ``model_id`` (the base, or a pinned adapter on it);
        ``extra`` fields are added to the response (its first chunk when streaming)."""
        request.model = model_id
        started = time.perf_counter()
        client_wants_usage = bool(request.stream and request.stream_options and request.stream_options.include_usage)
        if request.stream:
            # Always ask the engine for usage so every request is accounted; the usage chunk is
            # forwarded only when the client asked for it (OpenAI's `stream_options.include_usage`).
            request.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=False)
        backend = self.llms[name]
        stream = getattr(backend, endpoint)(request)
        try:
            async with asyncio.timeout(self.timeout_s):
                first = await anext(stream)
        except StopAsyncIteration:
            raise APIError(f"{name!r} returned no response") from None
        except TimeoutError:
            stream.cancel()
            raise UpstreamTimeoutError(f"{name!r} did not answer within {self.timeout_s:g} s") from None
        except asyncio.CancelledError:  # the client went away before the first token
            stream.cancel()
            raise
        except Exception as exc:
            stream.cancel()
            raise from_deployment_failure(exc, name) from exc

        head = first[0] if isinstance(first, list) and first else first
        if _is_error(head):
            raise from_engine_error(head.error.code, head.error.message, head.error.type, head.error.param)
        if not request.stream:
            body = head.model_dump() | (extra or {})
            usage = body.get("usage") or {}
            self.on_usage(UsageRecord(name, endpoint, False, usage.get("prompt_tokens", 0),
                                      usage.get("completion_tokens", 0), time.perf_counter() - started))
            return body
        return self._forward_stream(name, endpoint, first, stream, client_wants_usage, started, extra)

    async def _forward_stream(self, name: str, endpoint: str, first: Any, stream: LLMStream,
                              client_wants_usage: bool, started: float,
                              extra: dict[str, Any] | None = None) -> AsyncIterator[str]:
        usage = Usage()
        ttft: float | None = None
        finished = False
        deadline = started + self.timeout_s
        try:
            item = first
            while True:
                # One write per batch the replica sends: every write is a message to the HTTP proxy.
                out = []
                for packet in item if isinstance(item, list) else [item]:
                    if _is_error(packet):
                        out.append(sse_error(from_engine_error(packet.error.code, packet.error.message)))
                        continue
                    text = packet if isinstance(packet, str) else f"data: {packet.model_dump_json()}\n\n"
                    if '"usage":{' in text and '"choices":[]' in text:
                        usage = Usage(**json.loads(text[len("data: "):])["usage"])
                        if not client_wants_usage:
                            continue
                    if extra and text.startswith("data: {"):
                        text = f"data: {json.dumps(json.loads(text[len('data: '):]) | extra)}\n\n"
                        extra = None
                    out.append(text)
                if out:
                    if ttft is None and out[0] != DONE:
                        ttft = time.perf_counter() - started
                    yield "".join(out)
                try:
                    async with asyncio.timeout(max(deadline - time.perf_counter(), 0)):
                        item = await anext(stream)
                except StopAsyncIteration:
                    break
            finished = True
        except TimeoutError:
            finished = True
            yield sse_error(UpstreamTimeoutError(f"{name!r} did not finish within {self.timeout_s:g} s"))
            yield DONE
        except APIError as exc:
            finished = True
            yield sse_error(exc)
            yield DONE
        except Exception as exc:  # a replica died mid-stream: tell the client in-band
            finished = True
            yield sse_error(from_deployment_failure(exc, name))
            yield DONE
        finally:
            if not finished:
                # The client went away (or the gateway is shutting down): cancel the replica's
                # request so the engine aborts it and frees its slot and KV cache.
                stream.cancel()
            self.on_usage(UsageRecord(name, endpoint, True, usage.prompt_tokens, usage.completion_tokens,
                                      time.perf_counter() - started, ttft))

    # -- embeddings ----------------------------------------------------------------------------

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        name = await self._resolve(request.model, self.embedders, "embedding", self.llms, "/v1/chat/completions")
        started = time.perf_counter()
        texts = request.texts
        try:
            result = await self.embedders[name].embed(texts)
        except InputTooLongError as exc:
            cause = getattr(exc, "cause", exc)  # Ray wraps the replica's exception
            raise ContextLengthExceededError(str(InputTooLongError(cause.index, cause.tokens, cause.limit)),
                                             param="input") from None
        except Exception as exc:
            raise from_deployment_failure(exc, name) from exc
        vectors = result.vectors
        if request.dimensions is not None and request.dimensions != vectors.shape[1]:
            raise InvalidRequestError(
                f"{name!r} produces {vectors.shape[1]}-dimensional embeddings and cannot shorten them; "
                f"omit `dimensions` or set it to {vectors.shape[1]}", param="dimensions")
        if request.encoding_format == "base64":
            data = [EmbeddingData(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode())
                    for i, v in enumerate(vectors)]
        else:
            data = [EmbeddingData(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]
        prompt_tokens = sum(result.token_counts)
        self.on_usage(UsageRecord(name, "embeddings", False, prompt_tokens, 0, time.perf_counter() - started))
        return EmbeddingResponse(data=data, model=name,
                                 usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))


def _is_error(item: Any) -> bool:
    return isinstance(item, EngineErrorResponse)
