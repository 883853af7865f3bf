"""Pydantic schemas of the OpenAI wire format served by the gateway.

Chat and text completions reuse vLLM's request models (through ``ray.serve.llm``), which follow
OpenAI's API and add vLLM's sampling extras; the replicas consume exactly these objects. Embeddings
and the model list are ours, because the embedder is sentence-transformers, not vLLM.
"""

from __future__ import annotations

import time
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve.llm.openai_api_models import ChatCompletionRequest as _EngineChatRequest
from ray.serve.llm.openai_api_models import CompletionRequest as _EngineCompletionRequest

from ray_app.serve.internals import EngineErrorResponse  # what a replica yields for an engine error


class _RobustValidation:
    """vLLM's request models run validators that assume their input's shape (``for msg in messages``
    on a null ``messages``): what they raise is a bad request (400), not a server error."""

    @model_validator(mode="wrap")
    @classmethod
    def _bad_input_is_a_validation_error(cls, data, handler):
        try:
            return handler(data)
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise ValueError(f"malformed request ({type(e).__name__}: {e})") from None


class ChatCompletionRequest(_RobustValidation, _EngineChatRequest):
    pass


class CompletionRequest(_RobustValidation, _EngineCompletionRequest):
    pass


# vLLM moves StreamOptions between modules across releases; take it from the field that uses it.
StreamOptions = next(
    t for t in get_args(ChatCompletionRequest.model_fields["stream_options"].annotation) if t is not type(None)
)

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EngineErrorResponse",
    "StreamOptions",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingData",
    "ModelCard",
    "ModelList",
    "Usage",
]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or list of texts; token-id arrays are refused (the embedder has its own tokenizer)."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _texts_only(cls, value):
        if isinstance(value, str):
            value = [value]
        if not value:
            raise ValueError("input must not be empty")
        if not all(isinstance(v, str) for v in value):
            raise ValueError("token-id input is not supported: send text")
        if any(v == "" for v in value):
            raise ValueError("input must not contain empty strings")
        return value

    @property
    def texts(self) -> list[str]:
        return list(self.input)  # normalised to a list of strings by the validator


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ray_app"
    root: str | None = None
    parent: str | None = None
    kind: Literal["llm", "embedding", "adapter", "route"] = "llm"
    max_model_len: int | None = None
    tool_calling: Literal["auto", "required"] | None = Field(
        None, description="auto: every tool_choice; required: `none`, `required` and named only; null: no tools.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
