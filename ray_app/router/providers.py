"""Clients for the targets behind the router, all speaking OpenAI's chat format.

``Provider.chat`` returns a ``chat.completion`` dict and ``Provider.stream`` yields
``chat.completion.chunk`` dicts ending with a usage chunk, whatever the provider's own protocol:
``OpenAIProvider`` covers OpenAI, Azure OpenAI and any OpenAI-protocol server; ``BedrockProvider``
translates to and from Bedrock's Converse API. Retries with exponential backoff on 429, 5xx, timeouts
and connection errors happen here (the SDKs' own retries are switched off so there is one policy, with
an injectable sleep). A stream is retried only before its first chunk: after that the client has seen
output and a restart would duplicate it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import openai
from openai.resources.chat.completions import AsyncCompletions

from ray_app.router.config import Target

__all__ = ["BedrockProvider", "OpenAIProvider", "Provider", "ProviderError", "RetryPolicy", "from_converse",
           "make_provider", "to_converse"]


class ProviderError(Exception):
    """A failed provider call: ``status`` is the HTTP status when there was one."""

    def __init__(self, target: str, message: str, status: int | None = None, retryable: bool = False,
                 retry_after_s: float | None = None):
        self.target, self.status, self.retryable, self.retry_after_s = target, status, retryable, retry_after_s
        self.detail = message
        super().__init__(f"{target}: {message}" + (f" (HTTP {status})" if status else ""))

    def __reduce__(self):
        # raised in the Router replica, caught in the gateway: keep every field across the handle
        return type(self), (self.target, self.detail, self.status, self.retryable, self.retry_after_s)


def _retryable_status(status: int | None) -> bool:
    return status is not None and (status in (408, 429) or status >= 500)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:  # the server knows best when it will have capacity again
            return min(retry_after_s, self.max_delay_s)
        # Jitter spreads the retries of many concurrent requests that failed together.
        return min(self.max_delay_s, self.base_delay_s * 2 ** attempt) * (0.5 + random.random() / 2)


class Provider:
    """One target's client. Subclasses implement one attempt; retrying lives here."""

    def __init__(self, target: Target, retry: RetryPolicy | None = None):
        self.target = target
        self.retry = retry or RetryPolicy(max_retries=target.max_retries)

    async def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.retry.max_retries + 1):
            try:
                return await self._chat_once(request)
            except ProviderError as e:
                if not e.retryable or attempt == self.retry.max_retries:
                    raise
                await self.retry.sleep(self.retry.delay(attempt, e.retry_after_s))
        raise AssertionError("unreachable")

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for attempt in range(self.retry.max_retries + 1):
            chunks = self._stream_once(request)
            try:
                try:
                    first = await anext(chunks)
                except StopAsyncIteration:
                    return
                except ProviderError as e:
                    if not e.retryable or attempt == self.retry.max_retries:
                        raise
                    await self.retry.sleep(self.retry.delay(attempt, e.retry_after_s))
                    continue
                yield first
                async for chunk in chunks:
                    yield chunk
                return
            finally:
                await chunks.aclose()  # also when the consumer stops early: releases the HTTP response

    async def _chat_once(self, request: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _stream_once(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError


# Keyword arguments the SDK's create() takes; anything else a client sent rides along in extra_body.
_CREATE_PARAMS = frozenset(inspect.signature(AsyncCompletions.create).parameters) - {
    "self", "stream", "stream_options", "extra_headers", "extra_query", "extra_body", "timeout"}


class OpenAIProvider(Provider):
    """OpenAI, Azure OpenAI (``model`` is the deployment) or any OpenAI-protocol server."""

    def __init__(self, target: Target, client: openai.AsyncOpenAI, retry: RetryPolicy | None = None):
        super().__init__(target, retry)
        self.client = client

    @classmethod
    def from_target(cls, target: Target, api_key: str, retry: RetryPolicy | None = None) -> OpenAIProvider:
        common: dict[str, Any] = {"api_key": api_key, "timeout": target.timeout_s, "max_retries": 0}
        if target.kind == "azure":
            client: openai.AsyncOpenAI = openai.AsyncAzureOpenAI(
                azure_endpoint=target.base_url, api_version=target.api_version, **common)
        else:
            client = openai.AsyncOpenAI(base_url=target.base_url, **common)
        return cls(target, client, retry)

    def _kwargs(self, request: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: v for k, v in request.items() if k in _CREATE_PARAMS}
        extra = {k: v for k, v in request.items()
                 if k not in _CREATE_PARAMS and k not in ("stream", "stream_options")}
        kwargs["model"] = self.target.model
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    async def _chat_once(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.chat.completions.create(**self._kwargs(request))
        except openai.APIError as e:
            raise self._error(e) from e
        return response.model_dump(mode="json", exclude_unset=True)

    async def _stream_once(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            stream = await self.client.chat.completions.create(
                **self._kwargs(request), stream=True, stream_options={"include_usage": True})
            async with stream:
                async for chunk in stream:
                    yield chunk.model_dump(mode="json", exclude_unset=True)
        except openai.APIError as e:
            raise self._error(e) from e

    def _error(self, e: openai.APIError) -> ProviderError:
        name = self.target.name
        if isinstance(e, openai.APITimeoutError):
            return ProviderError(name, "timed out", retryable=True)
        if isinstance(e, openai.APIConnectionError):
            return ProviderError(name, f"connection failed: {e}", retryable=True)
        if isinstance(e, openai.APIStatusError):
            retry_after = e.response.headers.get("retry-after")
            return ProviderError(name, e.message, e.status_code, _retryable_status(e.status_code),
                                 float(retry_after) if retry_after and retry_after.isdigit() else None)
        return ProviderError(name, str(e))


# Bedrock stop reasons -> OpenAI finish_reason.
_FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls",
    "content_filtered": "content_filter", "guardrail_intervened": "content_filter",
}
# Stream exception events and Converse error codes -> the HTTP status they stand for.
_BEDROCK_STATUS = {
    "throttlingexception": 429, "internalserverexception": 500, "serviceunavailableexception": 503,
    "validationexception": 400, "modelstreamerrorexception": 424, "modeltimeoutexception": 408,
}


def _blocks(content: Any) -> list[dict[str, str]]:
    """Converse text blocks from OpenAI message content (a string or a list of parts)."""
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, list):
        if any(isinstance(p, Mapping) and p.get("type") != "text" for p in content):
            raise ValueError("only text content parts are supported for Bedrock targets")
        return [{"text": p.get("text", "")} for p in content]
    return []


def _tool_config(tools: list[Mapping[str, Any]], choice: Any) -> dict[str, Any]:
    """Converse's ``toolConfig`` from OpenAI's ``tools`` and ``tool_choice``."""
    specs = []
    for tool in tools:
        function = tool.get("function") or {}
        spec = {"name": function["name"], "inputSchema": {"json": function.get("parameters") or {"type": "object"}}}
        if function.get("description"):
            spec["description"] = function["description"]
        specs.append({"toolSpec": spec})
    config: dict[str, Any] = {"tools": specs}
    if choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, Mapping):
        config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    elif choice in (None, "auto"):
        config["toolChoice"] = {"auto": {}}
    return config


def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
    except ValueError:
        raise ValueError(f"tool call {call.get('id')!r}: arguments are not JSON") from None
    return {"toolUse": {"toolUseId": call["id"], "name": function["name"], "input": parsed}}


def to_converse(request: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    """Keyword arguments for ``converse``/``converse_stream`` from an OpenAI chat request: an
    assistant's ``tool_calls`` become ``toolUse`` blocks, a ``tool`` message a ``toolResult`` block
    in the user turn (Converse's roles are user and assistant only)."""
    unsupported = [k for k in ("functions", "response_format") if request.get(k)]
    if (request.get("n") or 1) > 1:
        unsupported.append("n > 1")
    if unsupported:
        raise ValueError(f"not supported for Bedrock targets: {unsupported}")
    system, messages = [], []
    used_tools = False
    for m in request.get("messages", []):
        role, blocks = m.get("role"), _blocks(m.get("content"))
        if role in ("system", "developer"):
            system += blocks
            continue
        if role == "assistant" and m.get("tool_calls"):
            blocks = [b for b in blocks if b["text"]] + [_tool_use(c) for c in m["tool_calls"]]
            used_tools = True
        elif role == "tool":
            role, used_tools = "user", True
            blocks = [{"toolResult": {"toolUseId": m.get("tool_call_id"), "content": _blocks(m.get("content"))}}]
        elif role not in ("user", "assistant"):
            raise ValueError(f"message role {role!r} is not supported for Bedrock targets")
        # Converse requires user and assistant turns to alternate: merge repeats into one turn.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += blocks
        else:
            messages.append({"role": role, "content": blocks})
    inference: dict[str, Any] = {}
    max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
    if max_tokens:
        inference["maxTokens"] = int(max_tokens)
    if request.get("temperature") is not None:
        inference["temperature"] = float(request["temperature"])
    if request.get("top_p") is not None:
        inference["topP"] = float(request["top_p"])
    if request.get("stop"):
        stop = request["stop"]
        inference["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    kwargs: dict[str, Any] = {"modelId": model_id, "messages": messages}
    tools, choice = request.get("tools"), request.get("tool_choice")
    if tools and (choice != "none" or used_tools):
        if choice == "none":  # Converse has no "none"; earlier tool blocks need the tools declared
            raise ValueError("tool_choice none after tool calls is not supported for Bedrock targets")
        kwargs["toolConfig"] = _tool_config(tools, choice)
    if system:
        kwargs["system"] = system
    if inference:
        kwargs["inferenceConfig"] = inference
    return kwargs


def _usage(usage: Mapping[str, Any]) -> dict[str, int]:
    prompt, completion = int(usage.get("inputTokens", 0)), int(usage.get("outputTokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(usage.get("totalTokens", prompt + completion))}


def from_converse(response: Mapping[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` dict from a Converse response."""
    blocks = response.get("output", {}).get("message", {}).get("content", [])
    text = "".join(b.get("text", "") for b in blocks)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [{"id": b["toolUse"]["toolUseId"], "type": "function",
              "function": {"name": b["toolUse"]["name"], "arguments": json.dumps(b["toolUse"].get("input", {}))}}
             for b in blocks if "toolUse" in b]
    if calls:
        message |= {"content": text or None, "tool_calls": calls}
    request_id = response.get("ResponseMetadata", {}).get("RequestId") or uuid.uuid4().hex
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": _FINISH.get(response.get("stopReason"), "stop")}],
        "usage": _usage(response.get("usage", {})),
    }


class BedrockProvider(Provider):
    """Bedrock's Converse API through boto3, whose blocking calls run in worker threads."""

    def __init__(self, target: Target, client: Any, retry: RetryPolicy | None = None):
        super().__init__(target, retry)
        self.client = client

    @classmethod
    def from_target(cls, target: Target, retry: RetryPolicy | None = None,
                    **client_kwargs: Any) -> BedrockProvider:
        """Credentials come from boto3's usual chain unless given in ``client_kwargs``."""
        import boto3
        from botocore.config import Config

        config = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                        read_timeout=target.timeout_s, connect_timeout=min(target.timeout_s, 10.0))
        client = boto3.client("bedrock-runtime", region_name=target.region, endpoint_url=target.endpoint_url,
                              config=config, **client_kwargs)
        return cls(target, client, retry)

    async def _chat_once(self, request: dict[str, Any]) -> dict[str, Any]:
        kwargs = self._converse_kwargs(request)
        try:
            response = await asyncio.to_thread(self.client.converse, **kwargs)
        except Exception as e:
            raise self._error(e) from e
        return from_converse(response, self.target.model)

    async def _stream_once(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        kwargs = self._converse_kwargs(request)
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
            body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.target.model,
                    "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
            if usage:
                body["usage"] = usage
            return body

        try:
            response = await asyncio.to_thread(self.client.converse_stream, **kwargs)
        except Exception as e:
            raise self._error(e) from e
        stream = response["stream"]
        events = iter(stream)
        calls: dict[int, int] = {}  # content block index -> tool call index
        try:
            while (event := await asyncio.to_thread(next, events, None)) is not None:
                if "messageStart" in event:
                    yield chunk({"role": event["messageStart"].get("role", "assistant"), "content": ""})
                elif "contentBlockStart" in event:
                    start = event["contentBlockStart"]
                    if (use := start.get("start", {}).get("toolUse")) is not None:
                        index = calls[start.get("contentBlockIndex", 0)] = len(calls)
                        yield chunk({"tool_calls": [{"index": index, "id": use["toolUseId"], "type": "function",
                                                     "function": {"name": use["name"], "arguments": ""}}]})
                elif "contentBlockDelta" in event:
                    delta = event["contentBlockDelta"]
                    if (use := delta.get("delta", {}).get("toolUse")) is not None:
                        index = calls.get(delta.get("contentBlockIndex", 0), 0)
                        yield chunk({"tool_calls": [{"index": index, "function": {"arguments": use.get("input", "")}}]})
                    elif text := delta.get("delta", {}).get("text"):
                        yield chunk({"content": text})
                elif "messageStop" in event:
                    yield chunk(finish=_FINISH.get(event["messageStop"].get("stopReason"), "stop"))
                elif "metadata" in event:
                    yield chunk(usage=_usage(event["metadata"].get("usage", {})))
        except Exception as e:
            raise self._error(e) from e
        finally:
            stream.close()

    def _converse_kwargs(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return to_converse(request, self.target.model)
        except ValueError as e:
            raise ProviderError(self.target.name, str(e), 400) from e

    def _error(self, e: Exception) -> ProviderError:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        name = self.target.name
        if isinstance(e, ProviderError):
            return e
        if isinstance(e, (ReadTimeoutError, ConnectTimeoutError)):
            return ProviderError(name, "timed out", retryable=True)
        if isinstance(e, (EndpointConnectionError, ConnectionClosedError)):
            return ProviderError(name, f"connection failed: {e}", retryable=True)
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = (_BEDROCK_STATUS.get(code.lower())
                      or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            message = e.response.get("Error", {}).get("Message") or code
            return ProviderError(name, message, status, _retryable_status(status))
        return ProviderError(name, f"{type(e).__name__}: {e}")


def make_provider(target: Target, environ: Mapping[str, str], retry: RetryPolicy | None = None,
                  **bedrock_client_kwargs: Any) -> Provider:
    """The provider for a target. ``environ`` (passed in by the caller, the one place that reads the
    process environment) supplies the API key named by ``api_key_env``."""
    if target.kind == "bedrock":
        return BedrockProvider.from_target(target, retry, **bedrock_client_kwargs)
    if target.kind == "local":
        raise ValueError(f"local target {target.name!r} is reached through its LLM deployment, not a provider")
    api_key = environ.get(target.api_key_env, "") if target.api_key_env else "unused"
    if not api_key:
        raise ValueError(f"target {target.name!r}: environment variable {target.api_key_env} is not set")
    return OpenAIProvider.from_target(target, api_key, retry)
