"""Pydantic schemas of the OpenAI wire format served by the gateway.

Chat and text completions are vLLM's request models (through ``ray.serve.llm``): the replicas consume
exactly these objects. What clients send is checked first against our public models
(``serve/public.py``, what ``/openapi.json`` shows), then dumped into these; a field only vLLM's
server knows is refused here too, for requests built in code. Embeddings and the model list are
ours, because the embedder is sentence-transformers, not vLLM.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray.serve.llm.openai_api_models import ChatCompletionRequest as _EngineChatRequest
from ray.serve.llm.openai_api_models import CompletionRequest as _EngineCompletionRequest

from ray_app.serve import public
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


class _EngineRequest:
    """vLLM's request model, entered from what a client sent (``from_client``) or built in code: a
    field only vLLM's server knows is refused by name either way."""

    public_model: ClassVar[type[BaseModel]]

    @model_validator(mode="before")
    @classmethod
    def _no_internal_fields(cls, data):
        if isinstance(data, dict):
            cls._refuse_internal(data)
        return data

    @classmethod
    def _refuse_internal(cls, data: dict) -> None:
        internal = sorted(set(data) & (set(cls.model_fields) - set(cls.public_model.model_fields)))
        if internal:
            raise ValueError(f"unrecognized request argument{'s' if len(internal) > 1 else ''}: {', '.join(internal)}")

    @classmethod
    def from_client(cls, data: Any):
        """A client's JSON body: checked strictly against the public model (what the schema says), then
        built as vLLM's request from what the client set, nothing more. Raises ValidationError."""
        if isinstance(data, dict):
            try:
                cls._refuse_internal(data)
            except ValueError as e:
                raise ValidationError.from_exception_data(cls.__name__, [
                    {"type": "value_error", "loc": (), "input": None, "ctx": {"error": e}}]) from None
        checked = cls.public_model.model_validate(data, strict=True)
        # null and unset mean the same here; vLLM's message types take no nulls
        return cls.model_validate(checked.model_dump(exclude_unset=True, exclude_none=True, by_alias=True))


class ChatCompletionRequest(_EngineRequest, _RobustValidation, _EngineChatRequest):
    public_model: ClassVar[type[BaseModel]] = public.ChatCompletionRequest


class CompletionRequest(_EngineRequest, _RobustValidation, _EngineCompletionRequest):
    public_model: ClassVar[type[BaseModel]] = public.CompletionRequest


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
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(
        min_length=1, max_length=2048)] = Field(
        description="Text or list of texts (not empty); token-id arrays are refused (the embedder has its own tokenizer).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0, description="Must be the model's own (no truncation here).")
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, value):
        if isinstance(value, list) and value and all(isinstance(v, int) or isinstance(v, list) for v in value):
            raise ValueError("token-id input is not supported: send text")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


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
