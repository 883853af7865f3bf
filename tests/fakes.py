"""Fakes that honour the backend interfaces and wire format of the real deployments.

``FakeLLM`` yields what ray.serve.llm's LLMServer yields: vLLM response objects for non-streaming
requests, ``ErrorResponse`` objects for engine errors, and lists of server-sent-event strings built
from vLLM's own stream-chunk models for streaming ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
)

from ray_app.documents.embedder import Embeddings, InputTooLongError


class FakeStream:
    def __init__(self, items: list[Any], delay_s: float = 0.0, fail_after: int | None = None):
        self._items = list(items)
        self._delay = delay_s
        self._fail_after = fail_after
        self._sent = 0
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._fail_after is not None and self._sent >= self._fail_after:
            from ray.exceptions import ActorDiedError

            raise ActorDiedError()
        if not self._items:
            raise StopAsyncIteration
        self._sent += 1
        return self._items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json(exclude_unset=True)}\n\n"


class FakeLLM:
    """Answers every prompt with ``reply`` split into words (one stream chunk per word)."""

    def __init__(self, reply: str = "Paris is the capital.", prompt_tokens: int = 7, max_model_len: int = 64,
                 delay_s: float = 0.0, fail_after: int | None = None):
        self.reply = reply
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.requests: list[Any] = []
        self.streams: list[FakeStream] = []

    def _words(self) -> list[str]:
        words = self.reply.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def _too_long(self, request) -> ErrorResponse | None:
        text = str(getattr(request, "messages", None) or getattr(request, "prompt", ""))
        if len(text.split()) > self.max_model_len:
            return ErrorResponse(error=ErrorInfo(
                message=f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                        f"prompt contains at least {len(text.split())} input tokens.",
                type="BadRequestError", param="input_tokens", code=400))
        return None

    def _stream(self, items: list[Any]) -> FakeStream:
        stream = FakeStream(items, self.delay_s, self.fail_after)
        self.streams.append(stream)
        return stream

    def chat(self, request) -> FakeStream:
        self.requests.append(request)
        if (error := self._too_long(request)) is not None:
            return self._stream([[error]] if request.stream else [error])
        created, words = int(time.time()), self._words()
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": self.prompt_tokens + len(words)}
        if not request.stream:
            return self._stream([ChatCompletionResponse(
                id="chatcmpl-fake", created=created, model=request.model,
                choices=[{"index": 0, "message": {"role": "assistant", "content": self.reply},
                          "finish_reason": "stop"}],
                usage=usage)])
        chunks = [ChatCompletionStreamResponse(
            id="chatcmpl-fake", created=created, model=request.model,
            choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        chunks += [ChatCompletionStreamResponse(
            id="chatcmpl-fake", created=created, model=request.model,
            choices=[{"index": 0, "delta": {"content": w}}]) for w in words]
        chunks.append(ChatCompletionStreamResponse(
            id="chatcmpl-fake", created=created, model=request.model,
            choices=[{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]))
        packets = [_sse(c) for c in chunks]
        if request.stream_options and request.stream_options.include_usage:
            packets.append(_sse(ChatCompletionStreamResponse(
                id="chatcmpl-fake", created=created, model=request.model, choices=[], usage=usage)))
        packets.append("data: [DONE]\n\n")
        # LLMServer batches stream packets into lists
        return self._stream([packets[i:i + 2] for i in range(0, len(packets), 2)])

    def completions(self, request) -> FakeStream:
        self.requests.append(request)
        if (error := self._too_long(request)) is not None:
            return self._stream([error])
        words = self._words()
        return self._stream([CompletionResponse(
            id="cmpl-fake", created=int(time.time()), model=request.model,
            choices=[{"index": 0, "text": "".join(words), "finish_reason": "stop"}],
            usage={"prompt_tokens": self.prompt_tokens, "completion_tokens": len(words),
                   "total_tokens": self.prompt_tokens + len(words)})])


class FakeEmbedder:
    """Deterministic unit vectors; one token per word plus two special tokens."""

    def __init__(self, dimensions: int = 8, max_tokens: int = 16):
        self.dimensions = dimensions
        self.max_tokens = max_tokens

    async def embed(self, texts: list[str]) -> Embeddings:
        counts = [len(t.split()) + 2 for t in texts]
        for i, n in enumerate(counts):
            if n > self.max_tokens:
                raise InputTooLongError(i, n, self.max_tokens)
        rng = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self.dimensions) for t in texts]
        vectors = np.array([v / np.linalg.norm(v) for v in rng], dtype=np.float32)
        return Embeddings(vectors, counts)
