"""The request bodies of chat and text completions as users send them: what ``/openapi.json`` shows,
and what a request is checked against first (strictly, as the schema reads).

OpenAI's fields with OpenAI's documented ranges, the vLLM sampling extras we support, and our
extensions (``rag``). vLLM's own request models, which the replicas consume, also take every
internal field of vLLM's server (``kv_transfer_params``, ``vllm_xargs``, ``mm_payload``, prompt
embeddings, ...) and message types validated lazily; none of that is our API. A validated public
request is dumped into vLLM's model (``protocol.ChatCompletionRequest.from_public``). Unknown fields
are ignored (dropped), as OpenAI-compatible servers do; vLLM-only fields are refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from ray_app.documents.retrieval import RetrievalOptions

__all__ = ["ChatCompletionRequest", "CompletionRequest", "MAX_TOKENS"]

MAX_TOKENS = 1 << 20  # no model here writes more; a bound keeps integers in the engine's range
_TEXT = 8 * 1024 * 1024  # characters of one string; the body limit (gateway.max_request_bytes) is the real one


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str = Field(max_length=_TEXT)


class ImageURL(_Part):
    url: str = Field(description="An https URL or a data: URL.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for function and schema names
Text = Union[Annotated[str, Field(max_length=_TEXT)], Annotated[list[TextPart], Field(min_length=1)]]


class FunctionCall(_Part):
    name: str
    arguments: str = Field(max_length=_TEXT, description="The arguments, as JSON text.")


class ToolCall(_Part):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Part):
    role: Literal["system", "developer"]
    content: Text
    name: str | None = None


class UserMessage(_Part):
    role: Literal["user"]
    content: Union[Annotated[str, Field(max_length=_TEXT)], Annotated[list[Part], Field(min_length=1)]]
    name: str | None = None


class AssistantMessage(_Part):
    role: Literal["assistant"]
    content: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    name: str | None = None


class ToolMessage(_Part):
    role: Literal["tool"]
    content: Text
    tool_call_id: str


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class FunctionDefinition(_Part):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON Schema.")
    strict: bool | None = None


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Part):
    name: Name


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Part):
    name: Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Part):
    type: Literal["text"]


class JSONObjectFormat(_Part):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Part):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat], Field(discriminator="type")]


class StreamOptions(_Part):
    include_usage: bool | None = None


def _needs(field: str, when: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for "``field`` set (and matching ``when``) requires ``then``": a check across two
    fields (vLLM's), said in the schema so that what it allows is what the server accepts."""
    return {"if": {"required": [field], "properties": {field: when}},
            "then": {"required": list(then), "properties": then}}


_STREAM_OPTIONS_NEED_STREAM = _needs("stream_options", {"type": "object"}, {"stream": {"const": True}})


class _Sampling(BaseModel):
    """What both endpoints take: OpenAI's sampling fields, then the vLLM extras we support."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="A served model, adapter (`base:adapter`) or route; see /v1/models. "
                                                "May be left out when one model is served.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]],
                          WithJsonSchema({"type": "object", "additionalProperties": False, "patternProperties": {
                              "^[0-9]{1,9}$": {"type": "number", "minimum": -100, "maximum": 100}}})] | None = (
        Field(None, description="Token id (as a string) -> bias."))
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    n: int | None = Field(1, ge=1, le=128, description="Choices; this server's limit is in the schema it serves.")
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    stop: Union[Annotated[str, Field(max_length=1024)],
                Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=4)], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # vLLM's sampling extras
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKENS, description="Sample from the k likeliest tokens; -1 or 0: "
                                                                      "all (vLLM).")
    min_p: float | None = Field(None, ge=0, le=1, description="Drop tokens under this share of the likeliest one's "
                                                              "probability (vLLM).")
    repetition_penalty: float | None = Field(None, gt=0, le=2, description="Above 1 discourages repeats (vLLM).")
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="At least this many tokens before a stop (vLLM).")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (vLLM).")
    return_token_ids: bool | None = Field(None, description="Also return the prompt's and the answer's token ids.")

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        # as the schema says (vLLM's own check lets an empty object through)
        if self.stream_options is not None and self.stream is not True:
            raise ValueError("stream_options can only be set with `stream: true`")
        return self


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        _needs("tool_choice", {"anyOf": [{"enum": ["auto", "required"]}, {"type": "object"}]},
               {"tools": {"type": "array"}}),
        _needs("top_logprobs", {"type": "integer", "minimum": 1}, {"logprobs": {"const": True}})]})

    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)]
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Needs `logprobs: true`.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description='Needs `tools`; a named function must be one of them.')
    parallel_tool_calls: bool | None = True
    rag: RetrievalOptions | None = Field(
        None, description="Answer from a collection: retrieved passages go before the chat, the answer carries "
                          "`citations`.")


class CompletionRequest(_Sampling):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    prompt: Union[Annotated[str, Field(min_length=1, max_length=_TEXT)],
                  Annotated[list[Annotated[str, Field(min_length=1, max_length=_TEXT)]],
                            Field(min_length=1, max_length=128)]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
