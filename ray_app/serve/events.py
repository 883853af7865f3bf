"""The typed events a generation stream is made of, end to end, and the one SSE encoder.

A local engine (ray.serve.llm's LLMServer over vLLM) sends server-sent-event strings; each is parsed
once into a ``Chunk`` that keeps the engine's own JSON text (``raw``), so the encoder writes it out
unchanged. A cloud target's chunks arrive as dicts (the provider SDKs') and are encoded once here.
Whether a chunk is the usage chunk, or an error, is read from the parsed object, never from the text.

    Started   the stream has a first chunk (after any fallback); ``info`` says where it went
    Chunks    ``chat.completion.chunk`` / ``text_completion`` chunks that arrived together
    Failed    an error after the stream started: reported in-band, then the stream ends
    Finished  the stream ended; ``outcome`` is what it used (the recorder prices it before [DONE])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from ray_app.accounting.recorder import Outcome
    from ray_app.serve.errors import APIError

__all__ = ["DONE", "Chunk", "Chunks", "Failed", "Finished", "RouteInfo", "Started", "StreamEvent", "parse_sse", "sse"]

DONE = "data: [DONE]\n\n"
_PREFIX = "data: "


def header_value(text: str, limit: int = 1024) -> str:
    """``text`` as an HTTP header value: one line of printable ASCII, cut (the log has it all). A control
    character in a header makes the server drop the whole response."""
    return "".join(ch if " " <= ch <= "~" else " " if ch in "\n\t\r" else "?" for ch in text[:limit])


@dataclass
class RouteInfo:
    """What the response headers report: where a routed request went, why, and what it cost."""

    route: str
    target: str
    model: str
    reasons: list[str]
    fallbacks: list[str] = field(default_factory=list)  # "target: why it failed", in order tried
    cost_usd: float | None = None

    def headers(self) -> dict[str, str]:
        reason = "; ".join([f"fallback after {f}" for f in self.fallbacks] + self.reasons)
        headers = {"x-ray-app-route": header_value(f"{self.route}/{self.target}"),
                   "x-ray-app-reason": header_value(reason)}
        if self.cost_usd is not None:
            headers["x-ray-app-cost-usd"] = f"{self.cost_usd:.8f}"
        return headers


@dataclass(frozen=True, slots=True)
class Chunk:
    data: dict[str, Any]
    raw: str | None = None  # the JSON as the engine wrote it; None once ``data`` was changed here

    @property
    def is_usage(self) -> bool:
        """OpenAI's closing usage chunk (``stream_options.include_usage``): no choices, a usage object."""
        return not self.data.get("choices") and self.data.get("usage") is not None

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.data.get("usage")

    @property
    def error(self) -> dict[str, Any] | None:
        """vLLM reports an error after a stream started as an event of its own: ``{"error": {...}}``."""
        return self.data.get("error")

    def merged(self, extra: dict[str, Any]) -> Chunk:
        """This chunk with ``extra`` fields added (RAG citations ride in a stream's first chunk)."""
        return Chunk(self.data | extra)


@dataclass(frozen=True, slots=True)
class Chunks:
    """Chunks that arrived together (a replica's batch): written to the client in one write."""

    items: tuple[Chunk, ...]


@dataclass(frozen=True, slots=True)
class Started:
    info: RouteInfo | None  # None for a request that named a served model


@dataclass(frozen=True, slots=True)
class Failed:
    error: APIError


@dataclass(frozen=True, slots=True)
class Finished:
    outcome: Outcome


StreamEvent = Union[Started, Chunks, Failed, Finished]


def parse_sse(text: str) -> Chunk | None:
    """One engine SSE string -> its chunk (None for ``[DONE]``: the gateway writes its own)."""
    payload = text[len(_PREFIX):].rstrip("\n") if text.startswith(_PREFIX) else text.strip()
    if payload == "[DONE]" or not payload:
        return None
    return Chunk(json.loads(payload), payload)


def sse(event: Chunk | Failed) -> str:
    """The one encoder of server-sent events."""
    if isinstance(event, Failed):
        return f"{_PREFIX}{json.dumps(event.error.body())}\n\n"
    return f"{_PREFIX}{event.raw if event.raw is not None else json.dumps(event.data)}\n\n"
