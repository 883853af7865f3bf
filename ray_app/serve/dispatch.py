"""Running a generation: the targets of a plan in order, with fallback before the first chunk.

A ``Plan`` is what a request resolved to: the served model it named (one local target, no fallback,
no breaker) or the router's decision (a chain of targets, ``ray_app.router.policy``). Local targets
are called through their LLM deployment's handle, here in the gateway, so their tokens take one hop;
cloud targets through the ``Router`` deployment, which holds the provider SDKs. Either way the
result is a whole answer or a stream of typed events (``ray_app.serve.events``), and an ``Outcome``
for the recorder: tokens, and the replica time each local attempt used.

Failures: a client error (4xx other than 408/429) comes back at once and says nothing about the
target's health (it would be refused anywhere: a prompt over the context must not open a breaker);
anything else is recorded against the target and the next one is tried. A cloud attempt is refused
here too if the request is local-only, whatever the chain says: the privacy rule has no second path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Awaitable, Literal, Protocol

from ray_app.accounting.recorder import Outcome, ReplicaShare
from ray_app.router.features import RequestFeatures
from ray_app.router.health import HealthBoard
from ray_app.router.policy import PrivacyError
from ray_app.router.providers import ProviderError
from ray_app.serve.errors import (
    APIError,
    EngineUnavailableError,
    UpstreamTimeoutError,
    from_deployment_failure,
    from_engine_error,
    root_cause,
)
from ray_app.serve.events import Chunk, Chunks, Failed, Finished, RouteInfo, Started, StreamEvent, parse_sse
from ray_app.serve.protocol import EngineErrorResponse, StreamOptions

__all__ = ["AllTargetsFailed", "CloudBackend", "Dispatcher", "LLMBackend", "LLMStream", "Plan", "TargetRef"]

logger = logging.getLogger("ray_app.gateway")

Endpoint = Literal["chat", "completions"]


class LLMStream(Protocol):
    """What a backend returns for one request: an async iterator that can be cancelled.

    Items are what ``ray.serve.llm``'s LLMServer yields: a response object (non-streaming), an
    ErrorResponse, or lists of server-sent-event strings ``"data: {...}\\n\\n"`` (streaming).
    """

    def __aiter__(self) -> AsyncIterator[Any]: ...
    async def __anext__(self) -> Any: ...
    def cancel(self) -> None: ...


class LLMBackend(Protocol):
    def chat(self, request: Any) -> LLMStream: ...
    def completions(self, request: Any) -> LLMStream: ...


class CloudBackend(Protocol):
    """The ``Router`` deployment: one attempt (with the provider's own retries) at a cloud target."""

    async def chat(self, target: str, request: dict[str, Any]) -> dict[str, Any]: ...
    def stream(self, target: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


class AllTargetsFailed(EngineUnavailableError):
    code = "no_target_available"

    def __init__(self, route: str, failures: list[str]):
        super().__init__(f"route {route!r}: every target failed: " + "; ".join(failures)[:2000],
                         headers={"retry-after": "5"})
        self.route, self.failures = route, failures


@dataclass(frozen=True)
class TargetRef:
    name: str  # the router target, or the served model for a direct request
    kind: Literal["local", "cloud"]
    backend: str  # local: the served LLM; cloud: the router target
    model_id: str  # what the engine is asked for (a pinned adapter id, or the model itself)
    timeout_s: float


@dataclass
class Plan:
    route: str  # "direct", or the route the client named
    targets: list[TargetRef]
    endpoint: Endpoint = "chat"
    reasons: list[str] = field(default_factory=list)
    features: RequestFeatures | None = None  # routed requests: what the policy decided on

    @property
    def direct(self) -> bool:
        return self.route == "direct"


def _status(error: APIError | ProviderError) -> int | None:
    return error.status_code if isinstance(error, APIError) else error.status


def _client_error(error: APIError | ProviderError) -> bool:
    status = _status(error)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def provider_to_api_error(error: ProviderError) -> APIError:
    """A target's own client error (the request itself is bad) as the client sees it."""
    return from_engine_error(error.status or 502, str(error))


async def _always_available(backend: str) -> None:
    return None


async def _next(stream: Any) -> tuple[bool, Any]:
    try:
        return True, await anext(stream)
    except StopAsyncIteration:
        return False, None


async def _result(call: Any) -> tuple[bool, Any]:
    return True, await call


class _Deadline:
    """A stream's deadline as one timer for all its chunks: ``asyncio.timeout`` around each chunk would arm
    and disarm a timer per token (7% of the replica's event loop at 32 clients, py-spy). When it fires while
    the stream waits for the engine, it cancels the waiting task, as ``asyncio.timeout`` does; between
    waits it only marks the stream expired, and the next wait fails at once."""

    def __init__(self, delay_s: float):
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._fire)
        self._waiting: asyncio.Task | None = None
        self.expired = False

    def _fire(self) -> None:
        self.expired = True
        if self._waiting is not None:
            self._waiting.cancel()

    async def wait(self, next_item: Awaitable[Any]) -> Any:
        """``await next_item``, or TimeoutError once the deadline has passed."""
        if self.expired:
            if asyncio.iscoroutine(next_item):
                next_item.close()
            raise TimeoutError
        task = asyncio.current_task()  # the task reading the stream can change (Starlette streams in its own)
        cancelling = task.cancelling()
        self._waiting = task
        try:
            item = await next_item
        except asyncio.CancelledError:
            if self.expired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise  # the client went away
        finally:
            self._waiting = None
        if self.expired and task.cancelling() > cancelling:  # our cancel was swallowed on the way down
            task.uncancel()
            raise TimeoutError
        return item

    def cancel(self) -> None:
        self._timer.cancel()


class Dispatcher:
    """``unavailable(backend)`` says why a local model (or ``"router"``, the Router deployment) has no
    running replica now; a request waiting for its first answer checks it every ``watch_s``, so a request
    caught by a replica's death gets a clear 503 instead of waiting for a replacement to start."""

    def __init__(self, llms: dict[str, LLMBackend], cloud: CloudBackend | None = None,
                 health: HealthBoard | None = None, shares: Callable[[str], ReplicaShare] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 unavailable: Callable[[str], Awaitable[str | None]] = _always_available, watch_s: float = 1.0):
        self.llms = llms
        self.cloud = cloud
        self.health = health
        self._shares = shares or (lambda backend: ReplicaShare())
        self._clock = clock
        self._unavailable = unavailable
        self._watch_s = watch_s

    # -- one attempt ---------------------------------------------------------------------------

    async def _first(self, stream: Any, target: TargetRef, watch: str) -> Any:
        """The first item of a handle's stream (or a handle call's result), within the target's time."""
        pending = asyncio.ensure_future(_next(stream) if hasattr(stream, "__anext__") else _result(stream))
        try:
            async with asyncio.timeout(target.timeout_s):
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=self._watch_s)
                    if done:
                        more, item = pending.result()
                        if not more:
                            raise EngineUnavailableError(f"{target.backend!r} returned no response")
                        return item
                    if (reason := await self._unavailable(watch)) is not None:
                        raise EngineUnavailableError(f"{watch!r} became unavailable: {reason}",
                                                     headers={"retry-after": "5"})
        except TimeoutError:
            raise UpstreamTimeoutError(f"{target.backend!r} did not answer within {target.timeout_s:g} s") from None
        except asyncio.CancelledError:  # the client went away
            raise
        except (APIError, ProviderError) as exc:
            raise root_cause(exc) from None  # a replica's own error, without Ray's wrapper
        except Exception as exc:
            raise from_deployment_failure(exc, target.backend) from exc
        finally:
            cancel = getattr(stream, "cancel", None)  # a handle call; a plain coroutine goes with its task
            if not pending.done():
                pending.cancel()
                if cancel:
                    cancel()
            elif pending.exception() is not None and cancel:
                cancel()

    async def _check_running(self, target: TargetRef) -> None:
        if (reason := await self._unavailable(target.backend)) is not None:
            raise EngineUnavailableError(f"{target.backend!r} is unavailable: {reason}", headers={"retry-after": "5"})

    async def _local_complete(self, target: TargetRef, request: Any, endpoint: Endpoint) -> dict[str, Any]:
        await self._check_running(target)
        request.model = target.model_id
        head = await self._first(getattr(self.llms[target.backend], endpoint)(request), target, target.backend)
        if isinstance(head, list) and head:
            head = head[0]
        if isinstance(head, EngineErrorResponse):
            raise from_engine_error(head.error.code, head.error.message, head.error.type, head.error.param)
        return head.model_dump()

    async def _local_stream(self, target: TargetRef, request: Any, endpoint: Endpoint,
                            deadline: float) -> AsyncIterator[list[Chunk]]:
        await self._check_running(target)
        request.model = target.model_id
        # Always ask the engine for usage so every request is accounted; the usage chunk reaches the
        # client only when it asked (OpenAI's `stream_options.include_usage`).
        request.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=False)
        stream = getattr(self.llms[target.backend], endpoint)(request)
        finished = False
        deadline_timer: _Deadline | None = None
        try:
            item = await self._first(stream, target, target.backend)
            deadline_timer = _Deadline(max(deadline - self._clock(), 0))
            while True:
                batch = []
                for packet in item if isinstance(item, list) else [item]:
                    if isinstance(packet, EngineErrorResponse):
                        error = packet.error
                        raise from_engine_error(error.code, error.message, error.type, error.param)
                    chunk = parse_sse(packet) if isinstance(packet, str) else Chunk(packet.model_dump())
                    if chunk is None:
                        continue
                    if chunk.error is not None:
                        e = chunk.error
                        raise from_engine_error(int(e.get("code") or 500), e.get("message", "engine error"),
                                                e.get("type"), e.get("param"))
                    batch.append(chunk)
                if batch:
                    yield batch
                try:
                    item = await deadline_timer.wait(anext(stream))
                except StopAsyncIteration:
                    finished = True
                    return
                except TimeoutError:
                    raise UpstreamTimeoutError(f"{target.backend!r} did not finish within {target.timeout_s:g} s")
                except APIError:
                    raise
                except Exception as exc:  # a replica died mid-stream
                    raise from_deployment_failure(root_cause(exc), target.backend) from exc
        finally:
            if deadline_timer is not None:
                deadline_timer.cancel()
            if not finished:
                # The client went away, or we gave up: cancel the replica's request so the engine
                # aborts it and frees its slot and KV cache.
                stream.cancel()

    async def _cloud_stream(self, target: TargetRef, body: dict[str, Any]) -> AsyncIterator[list[Chunk]]:
        stream = self.cloud.stream(target.backend, body)
        try:
            yield [Chunk(await self._first(stream, target, "router"))]
            async for data in stream:
                yield [Chunk(data)]
        except Exception as exc:  # errors raised in the Router replica arrive wrapped by Ray
            # (Ray's wrapper subclasses the cause's class: take the cause itself, not its traceback text)
            cause = root_cause(exc)
            if isinstance(cause, (ProviderError, APIError)):
                raise cause from None
            raise from_deployment_failure(cause, "router") from exc
        finally:
            if hasattr(stream, "cancel"):
                stream.cancel()

    async def _cloud_complete(self, target: TargetRef, body: dict[str, Any]) -> dict[str, Any]:
        # the provider retries inside the Router replica: its attempts share a budget of 4 timeouts
        patient = TargetRef(target.name, target.kind, target.backend, target.model_id, target.timeout_s * 4)
        try:
            return await self._first(self.cloud.chat(target.backend, body), patient, "router")
        except Exception as exc:  # Ray's wrapper subclasses the cause's class: take the cause itself
            cause = root_cause(exc)
            if isinstance(cause, (ProviderError, APIError)):
                raise cause from None
            raise from_deployment_failure(cause, "router") from exc

    # -- the chain -----------------------------------------------------------------------------

    def _admitted(self, plan: Plan, failures: list[str]):
        for target in plan.targets:
            if target.kind == "cloud":
                if plan.features is not None and plan.features.local_only:
                    raise PrivacyError(f"{target.name} is a cloud target and the request is local-only "
                                       f"({'; '.join(plan.features.privacy_reasons())})", [])
                if self.cloud is None:
                    failures.append(f"{target.name}: no Router deployment for cloud targets")
                    continue
            if plan.direct or self.health is None or self.health[target.name].allow_request():
                yield target
            else:
                failures.append(f"{target.name}: circuit breaker open")

    def _record(self, plan: Plan, target: TargetRef, ok: bool, started: float | None = None) -> None:
        if not plan.direct and self.health is not None:
            self.health[target.name].record(ok, None if started is None else self._clock() - started)

    def _failed(self, plan: Plan, target: TargetRef, error: APIError | ProviderError, failures: list[str]) -> None:
        if plan.direct or _client_error(error):
            # a bad request would be refused anywhere; it says nothing about the target's health
            raise provider_to_api_error(error) if isinstance(error, ProviderError) else error
        self._record(plan, target, False)
        failures.append(f"{target.name}: {error.message if isinstance(error, APIError) else error}")
        logger.warning("target %s failed: %s", target.name, failures[-1])

    def _info(self, plan: Plan, target: TargetRef, failures: list[str]) -> RouteInfo | None:
        if plan.direct:
            return None
        return RouteInfo(plan.route, target.name, target.model_id, plan.reasons, list(failures))

    @staticmethod
    def _take_usage(outcome: Outcome, usage: dict[str, Any] | None) -> None:
        if usage:
            outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            outcome.completion_tokens = int(usage.get("completion_tokens") or 0)

    def _begin(self, target: TargetRef) -> tuple[ReplicaShare | None, int | None]:
        if target.kind != "local":
            return None, None
        share = self._shares(target.backend)
        return share, share.start()

    @staticmethod
    def _end(outcome: Outcome, target: TargetRef, share: ReplicaShare | None, token: int | None) -> None:
        if share is not None:
            outcome.replica_s[target.backend] = outcome.replica_s.get(target.backend, 0.0) + share.stop(token)

    async def complete(self, plan: Plan, request: Any, body: dict[str, Any] | None,
                       outcome: Outcome) -> tuple[dict[str, Any], RouteInfo | None]:
        """The whole answer of the first target that gives one. ``body`` is the request as a dict
        for cloud targets (None when the plan has none)."""
        failures: list[str] = []
        for target in self._admitted(plan, failures):
            share, token = self._begin(target)
            started = self._clock()
            try:
                if target.kind == "local":
                    answer = await self._local_complete(target, request, plan.endpoint)
                else:
                    answer = await self._cloud_complete(target, body)
            except (APIError, ProviderError) as e:
                self._failed(plan, target, e, failures)
                continue
            finally:
                self._end(outcome, target, share, token)
            self._record(plan, target, True, started)
            outcome.target, outcome.model = target.name, target.model_id
            outcome.cloud_target = target.name if target.kind == "cloud" else None
            self._take_usage(outcome, answer.get("usage"))
            return answer, self._info(plan, target, failures)
        raise AllTargetsFailed(plan.route, failures)

    async def stream(self, plan: Plan, request: Any, body: dict[str, Any] | None, outcome: Outcome,
                     timeout_s: float) -> AsyncIterator[StreamEvent]:
        """``Started`` once a target has produced its first chunk, the ``Chunks``, then ``Finished``
        (after a ``Failed`` when the target broke off). A stream fails over only before its first chunk:
        after that the client has seen output."""
        failures: list[str] = []
        deadline = self._clock() + timeout_s
        for target in self._admitted(plan, failures):
            share, token = self._begin(target)
            started = self._clock()
            if target.kind == "local":
                attempt = self._local_stream(target, request, plan.endpoint, deadline)
            else:
                attempt = self._cloud_stream(target, body)
            try:
                try:
                    batch = await anext(attempt)
                except StopAsyncIteration:
                    self._failed(plan, target, EngineUnavailableError(f"{target.name!r}: empty stream"), failures)
                    continue
                except (APIError, ProviderError) as e:
                    self._failed(plan, target, e, failures)
                    continue
                outcome.target, outcome.model = target.name, target.model_id
                outcome.cloud_target = target.name if target.kind == "cloud" else None
                yield Started(self._info(plan, target, failures))
                outcome.status = "incomplete"  # until the stream ends: the client may go away first
                try:
                    while True:
                        for chunk in batch:
                            if chunk.is_usage:
                                self._take_usage(outcome, chunk.usage)
                        yield Chunks(tuple(batch))
                        batch = await anext(attempt)
                except StopAsyncIteration:
                    outcome.status = "ok"
                    self._record(plan, target, True, started)
                except (APIError, ProviderError) as e:  # mid-stream: no failover
                    outcome.status = "upstream_error"
                    if not _client_error(e):
                        self._record(plan, target, False)
                    yield Failed(provider_to_api_error(e) if isinstance(e, ProviderError) else e)
                self._end(outcome, target, share, token)
                share = None
                yield Finished(outcome)
                return
            finally:
                await attempt.aclose()
                self._end(outcome, target, share, token)
        raise AllTargetsFailed(plan.route, failures)
