"""The serving logic behind the OpenAI routes: a plain class, tested without Ray.

``OpenAIService`` turns a request into a plan (the served model or adapter it names, or the router's
decision for a route such as ``auto``), holds the caller's budget for it, runs it through the
dispatcher (``ray_app.serve.dispatch``), and settles what it used with the one spend recorder before
the answer, or a stream's ``[DONE]``, goes out. Backends are Serve DeploymentHandles in production
(``ray.serve.llm`` replicas, the embedder, the Router deployment for cloud targets) and fakes that
emit the same objects and server-sent-event strings in unit tests.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ray_app.accounting.config import AuthConfig
from ray_app.accounting.ledger import BudgetExceeded, Ledger
from ray_app.accounting.recorder import CostCeilingExceeded, Outcome, SpendRecorder
from ray_app.datasets.capture import CaptureLog
from ray_app.documents.embedder import Embeddings, InputTooLongError
from ray_app.router.config import Route
from ray_app.router.policy import RoutingError, estimate_cost
from ray_app.router.service import RouterService
from ray_app.serve.auth import OPEN_ANONYMOUS, Caller
from ray_app.serve.dispatch import CloudBackend, Dispatcher, LLMBackend, Plan, TargetRef
from ray_app.serve.documents_api import DocumentsService
from ray_app.serve.errors import (
    APIError,
    BudgetExceededError,
    ContextLengthExceededError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    from_deployment_failure,
    from_routing_error,
    internal_error,
)
from ray_app.serve.events import DONE, Chunks, Failed, Finished, Started, StreamEvent, sse
from ray_app.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Usage,
)

__all__ = ["AdapterCatalog", "EmbedderBackend", "OpenAIService", "UsageRecord", "WithHeaders", "log_usage"]

logger = logging.getLogger("ray_app.gateway")

# request bodies up to this size are scanned for PII on the event loop (~1 ms at most; RAG context adds
# at most `knowledge.max_context_chars`), larger ones in a thread
INLINE_SCAN_BYTES = 8 * 1024


class AdapterCatalog(Protocol):
    """LoRA adapters of one base model (``ray_app.serve.adapters.AdapterCatalog``)."""

    async def aresolve(self, ref: str) -> Any: ...  # -> .model_id; raises AdapterNotFoundError / AdapterBaseMismatchError
    def model_ids(self) -> list[str]: ...


class EmbedderBackend(Protocol):
    async def embed(self, texts: list[str]) -> Embeddings: ...


@dataclass
class WithHeaders:
    """A response body (or SSE stream) plus headers for the HTTP layer (route, reason, cost)."""

    result: dict | AsyncIterator[str]
    headers: dict[str, str]


@dataclass(frozen=True)
class UsageRecord:
    model: str
    endpoint: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ttft_seconds: float | None = None


def log_usage(record: UsageRecord, *, line: bool) -> None:
    """Count the request in the metrics and, with ``line``, write its usage line to the log."""
    from ray_app.metrics import record_request

    record_request(record.model, record.endpoint, record.prompt_tokens, record.completion_tokens,
                   record.seconds, record.ttft_seconds)
    if line:
        logger.info(
            "usage endpoint=%s model=%s stream=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%s total_ms=%.0f",
            record.endpoint, record.model, record.stream, record.prompt_tokens, record.completion_tokens,
            "-" if record.ttft_seconds is None else f"{record.ttft_seconds * 1000:.0f}", record.seconds * 1000,
        )


def check_tool_choice(request: Any, model: str, tool_calling: str | None) -> None:
    """400 for tools the model is not set up for, naming the Serve config's fields (vLLM's own
    message names command-line flags a user of serve_config.yaml cannot set)."""
    if not getattr(request, "tools", None) or request.tool_choice == "none":
        return
    if tool_calling is None:
        raise InvalidRequestError(
            f"model {model!r} is not set up for tool calling: give it `tools:` under `llms` in the Serve config "
            "(e.g. `tools: {parser: hermes, chat_template: smollm2-tools}`), or send `tool_choice: none`",
            param="tools", code="tools_not_configured")
    if tool_calling == "required" and request.tool_choice in (None, "auto"):
        raise InvalidRequestError(
            f"model {model!r} takes `tool_choice` `required` or a named function, not `auto` "
            "(`tools.auto_tool_choice: false` in its config)", param="tool_choice", code="tools_not_configured")


async def _always_available(model: str) -> None:
    return None


@dataclass
class OpenAIService:
    llms: dict[str, LLMBackend]
    embedders: dict[str, EmbedderBackend]
    cards: dict[str, ModelCard]
    recorder: SpendRecorder | None = None  # default: an in-memory ledger (tests of the routes alone)
    router: RouterService | None = None  # decides for route names (`auto`, ...)
    cloud: CloudBackend | None = None  # the Router deployment: calls cloud targets
    documents: DocumentsService = field(default_factory=DocumentsService)
    adapters: dict[str, AdapterCatalog] = field(default_factory=dict)  # base model -> its adapters
    timeout_s: float = 600.0
    # model -> why it cannot serve now (None when it can); the gateway answers from Serve's status
    unavailable: Callable[[str], Awaitable[str | None]] = _always_available
    clock: Callable[[], float] = time.monotonic
    capture: CaptureLog | None = None  # where opted-in chats are kept as training conversations
    log_requests: bool = False  # a usage line per request in the log (GatewayConfig.log_requests)
    _known: list[str] = field(init=False)
    _pending: set[asyncio.Task] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._known = sorted(self.cards)
        if self.recorder is None:
            self.recorder = SpendRecorder(AuthConfig(), Ledger(":memory:"))
        self.dispatcher = Dispatcher(self.llms, self.cloud, self.router.health if self.router else None,
                                     self.recorder.share, self.clock, self.unavailable)

    @property
    def routes(self) -> list[str]:
        return self.router.routes if self.router is not None else []

    # -- models --------------------------------------------------------------------------------

    async def list_models(self) -> ModelList:
        cards = [self.cards[name] for name in self._known]
        cards += [ModelCard(id=route, kind="route") for route in self.routes]
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

    async def _resolve_llm(self, model: str | None, kind: str) -> tuple[str, str]:
        """(backend name, model id for the engine): the base itself, or a pinned adapter on it."""
        if model is not None and ":" in model and model not in self.cards:
            base, model_id = await self._resolve_adapter(model)
            return await self._resolve(base, self.llms, kind, self.embedders, "/v1/embeddings"), model_id
        name = await self._resolve(model, self.llms, kind, self.embedders, "/v1/embeddings")
        return name, name

    # -- admission: caps and budget ------------------------------------------------------------

    def _apply_caps(self, request: Any, caller: Caller, route: Route | None) -> None:
        """Refuse what is over a cap (400); give a budgeted caller's request a max_tokens so its
        reservation bounds what it can cost."""
        key = caller.key
        limits_n = [self.recorder.config.max_n, key and key.max_n, route and route.max_n]
        max_n = min(n for n in limits_n if n)
        if (request.n or 1) > max_n:
            raise InvalidRequestError(f"n={request.n} is over this server's limit of {max_n} choices per request",
                                      param="n")
        caps = [c for c in (key and key.max_tokens, route and route.max_tokens) if c]
        cap = min(caps) if caps else None
        field_name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        requested = getattr(request, field_name, None)
        if cap is not None and requested is not None and requested > cap:
            raise InvalidRequestError(f"{field_name}={requested} is over the limit of {cap} for this "
                                      f"{'key' if key and key.max_tokens == cap else 'route'}", param=field_name)
        if requested is None and (cap is not None or (key is not None and self.recorder.budget(key) is not None)):
            request.max_tokens = cap or self.recorder.config.default_max_tokens

    async def _reserve(self, caller: Caller, estimate_usd: float) -> str | None:
        try:
            return await self.recorder.reserve(caller.key, estimate_usd)
        except BudgetExceeded as e:
            raise BudgetExceededError(str(e)) from None
        except CostCeilingExceeded as e:
            raise BudgetExceededError(str(e), code="cost_ceiling_exceeded") from None

    def _estimate(self, plan: Plan, request: Any) -> float:
        completion = (request.n or 1) * (getattr(request, "max_completion_tokens", None) or request.max_tokens or 0)
        if plan.direct:
            return self.recorder.estimate_local(plan.targets[0].backend, completion)
        return max(estimate_cost(self.router.config.target(t.name), plan.features) for t in plan.targets)

    # -- plans ---------------------------------------------------------------------------------

    async def _plan(self, request: Any, caller: Caller, endpoint: str,
                    retrieved: list[str]) -> tuple[Plan, dict[str, Any] | None]:
        """What the request runs on, and (for routes) the request as a dict, made once for the
        PII scan and the cloud targets."""
        if endpoint == "chat" and request.model in self.routes:
            route = self.router.config.routes[request.model]
            self._apply_caps(request, caller, route)
            body = request.model_dump(mode="json", exclude_unset=True)
            scan = (self.router.features, body, caller.headers, caller.confidential, retrieved,
                    caller.key.max_request_usd if caller.key else None)
            # The full-text PII scan is linear: a long prompt's takes milliseconds, so it runs off the loop;
            # a short one's takes less than the thread hop would (on a busy loop the hop waits for the GIL).
            length = caller.headers.get("content-length", "")
            if length.isdigit() and int(length) <= INLINE_SCAN_BYTES:
                features = scan[0](*scan[1:])
            else:
                features = await asyncio.to_thread(*scan)
            try:
                decision = self.router.decide(features)
            except RoutingError as e:
                raise from_routing_error(e) from None
            targets = []
            for name in decision.chain:
                t = self.router.config.target(name)
                targets.append(TargetRef(name, "local" if t.kind == "local" else "cloud", t.model if t.kind == "local"
                                         else name, t.model, t.timeout_s))
            return Plan(decision.route, targets, "chat", decision.reasons, features), body
        self._apply_caps(request, caller, None)
        name, model_id = await self._resolve_llm(request.model, "chat" if endpoint == "chat" else "completion")
        if endpoint == "chat":
            check_tool_choice(request, name, self.cards[name].tool_calling)
        return Plan("direct", [TargetRef(name, "local", name, model_id, self.timeout_s)], endpoint), None

    # -- chat and text completions -------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest, caller: Caller = OPEN_ANONYMOUS) -> dict | WithHeaders:
        extra: dict[str, Any] = {}
        retrieved: list[str] = []
        if (rag := (request.model_extra or {}).pop("rag", None)) is not None:
            # retrieval-augmented: numbered sources go into the prompt, citations come back with the answer
            request.messages, extra["citations"], passages = await self.documents.augment(
                list(request.messages), rag, caller)
            retrieved = [p.sensitivity for p in passages]  # a confidential chunk keeps the request local
        plan, body = await self._plan(request, caller, "chat", retrieved)
        return await self._run(plan, request, body, caller, extra, self._capture_for(request, caller, plan, retrieved))

    def _capture_for(self, request: Any, caller: Caller, plan: Plan, retrieved: list[str]) -> dict[str, Any] | None:
        """Provenance of a chat that is to be captured (a key's or a route's opt-in), else None."""
        route = self.router.config.routes.get(plan.route) if self.router and not plan.direct else None
        if self.capture is None or not ((caller.key and caller.key.capture) or (route and route.capture)):
            return None
        local_only = caller.confidential or "confidential" in retrieved or bool(plan.features and plan.features.local_only)
        return {"messages": [m if isinstance(m, dict) else dict(m) for m in request.messages],
                "metadata": {"key_id": caller.key_id, "route": plan.route, "model": plan.targets[0].model_id,
                             "sensitivity": "confidential" if local_only else "internal"}}

    async def completions(self, request: CompletionRequest, caller: Caller = OPEN_ANONYMOUS) -> dict | WithHeaders:
        plan, body = await self._plan(request, caller, "completions", [])
        return await self._run(plan, request, body, caller, {})

    async def _run(self, plan: Plan, request: Any, body: dict[str, Any] | None, caller: Caller,
                   extra: dict[str, Any], capture: dict[str, Any] | None = None) -> dict | WithHeaders:
        reservation = await self._reserve(caller, self._estimate(plan, request))
        outcome = Outcome(plan.route, plan.targets[0].name if plan.targets else "-", request.model or "-",
                          started=self.clock())
        if not request.stream:
            try:
                answer, info = await self.dispatcher.complete(plan, request, body, outcome)
            except BaseException as exc:
                await self._settle_failure(caller, reservation, outcome, exc)
                raise self._client_error(exc) from None
            cost = await self._settle(caller, reservation, outcome, plan.endpoint, False)
            if capture is not None and answer.get("choices"):
                self._keep(capture, answer["choices"][0].get("message", {}).get("content") or "")
            if info is not None:
                info.cost_usd = cost
            headers = info.headers() if info is not None else {"x-ray-app-cost-usd": f"{cost:.8f}"}
            return WithHeaders(answer | extra, headers)

        client_wants_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = self.dispatcher.stream(plan, request, body, outcome, self.timeout_s)
        try:
            started = await anext(events)
        except BaseException as exc:
            await events.aclose()
            await self._settle_failure(caller, reservation, outcome, exc)
            raise self._client_error(exc) from None
        assert isinstance(started, Started)
        stream = self._sse(events, caller, reservation, outcome, extra, client_wants_usage, plan.endpoint, capture)
        return WithHeaders(stream, started.info.headers() if started.info else {})

    def _keep(self, capture: dict[str, Any], answer: str) -> None:
        try:
            self.capture.write(capture["messages"], answer, capture["metadata"])
        except OSError:  # capture is for later training: a full disk must not fail the answer
            logger.exception("could not capture a conversation")

    async def _sse(self, events: AsyncIterator[StreamEvent], caller: Caller, reservation: str | None,
                   outcome: Outcome, extra: dict[str, Any], client_wants_usage: bool,
                   endpoint: str, capture: dict[str, Any] | None = None) -> AsyncIterator[str]:
        settled = False
        ttft: float | None = None
        said: list[str] = []
        try:
            try:
                async for event in events:
                    if isinstance(event, Chunks):
                        out = []
                        for chunk in event.items:
                            if capture is not None and chunk.data.get("choices"):
                                said.append((chunk.data["choices"][0].get("delta") or {}).get("content") or "")
                            if chunk.is_usage and not client_wants_usage:
                                continue
                            if extra:
                                chunk, extra = chunk.merged(extra), {}
                            out.append(sse(chunk))
                        if out:
                            ttft = ttft if ttft is not None else self.clock() - outcome.started
                            yield "".join(out)
                    elif isinstance(event, Failed):
                        yield sse(event)
                    elif isinstance(event, Finished):
                        # durable before the client hears the stream is complete
                        await self._settle(caller, reservation, outcome, endpoint, True, ttft)
                        settled = True
                        if capture is not None and outcome.status == "ok":
                            self._keep(capture, "".join(said))
            except (APIError, RoutingError) as exc:
                yield sse(Failed(self._client_error(exc)))
            except Exception as exc:  # a broken replica mid-stream: tell the client in-band
                yield sse(Failed(from_deployment_failure(exc, outcome.target)))
        finally:
            await events.aclose()  # the client went away: the target's request is cancelled
            if not settled:
                # the client is gone (or the stream broke): charge what was used, off this cancelled task
                task = asyncio.get_running_loop().create_task(
                    self._settle(caller, reservation, outcome, endpoint, True, ttft))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
        yield DONE

    def _client_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, RoutingError):
            return from_routing_error(exc)
        if isinstance(exc, (APIError, asyncio.CancelledError)):
            return exc
        return internal_error(exc, "while generating")

    async def _settle(self, caller: Caller, reservation: str | None, outcome: Outcome, endpoint: str,
                      stream: bool, ttft: float | None = None) -> float:
        cost = await self.recorder.settle(caller.key, reservation, outcome, caller.estimated_tokens)
        log_usage(UsageRecord(outcome.model, endpoint, stream, outcome.prompt_tokens, outcome.completion_tokens,
                              self.clock() - outcome.started, ttft), line=self.log_requests)
        return cost

    async def _settle_failure(self, caller: Caller, reservation: str | None, outcome: Outcome,
                              exc: BaseException) -> None:
        """A request that reached a target and failed: its row says so (and charges any replica time)."""
        outcome.status = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
        try:
            await asyncio.shield(self.recorder.settle(caller.key, reservation, outcome, caller.estimated_tokens))
        except Exception:
            logger.exception("could not record a failed request in the ledger")

    # -- embeddings ----------------------------------------------------------------------------

    async def embeddings(self, request: EmbeddingRequest, caller: Caller = OPEN_ANONYMOUS) -> WithHeaders:
        name = await self._resolve(request.model, self.embedders, "embedding", self.llms, "/v1/chat/completions")
        texts = request.texts
        estimate = self.recorder.estimate_local(name, math.ceil(sum(len(t) for t in texts) / 400))
        reservation = await self._reserve(caller, estimate)
        outcome = Outcome("direct", name, name, started=self.clock())
        share = self.recorder.share(name)
        token = share.start()
        try:
            result = await self.embedders[name].embed(texts)
        except BaseException as exc:
            outcome.replica_s[name] = share.stop(token)
            await self._settle_failure(caller, reservation, outcome, exc)
            if isinstance(exc, InputTooLongError):
                cause = getattr(exc, "cause", exc)  # Ray wraps the replica's exception
                raise ContextLengthExceededError(str(InputTooLongError(cause.index, cause.tokens, cause.limit)),
                                                 param="input") from None
            if isinstance(exc, (APIError, asyncio.CancelledError)):
                raise
            raise from_deployment_failure(exc, name) from exc
        outcome.replica_s[name] = share.stop(token)
        vectors = result.vectors
        if request.dimensions is not None and request.dimensions != vectors.shape[1]:
            await self._settle_failure(caller, reservation, outcome, ValueError("dimensions"))
            raise InvalidRequestError(
                f"{name!r} produces {vectors.shape[1]}-dimensional embeddings and cannot shorten them; "
                f"omit `dimensions` or set it to {vectors.shape[1]}", param="dimensions")
        if request.encoding_format == "base64":
            data = [EmbeddingData(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode())
                    for i, v in enumerate(vectors)]
        else:
            data = [EmbeddingData(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]
        outcome.prompt_tokens = sum(result.token_counts)
        cost = await self._settle(caller, reservation, outcome, "embeddings", False)
        response = EmbeddingResponse(data=data, model=name, usage=Usage(prompt_tokens=outcome.prompt_tokens,
                                                                       total_tokens=outcome.prompt_tokens))
        return WithHeaders(response.model_dump(), {"x-ray-app-cost-usd": f"{cost:.8f}"})
