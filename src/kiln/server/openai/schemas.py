"""Wire schemas of the OpenAI-compatible API (``/v1/...``), as vLLM serves it.

Requests are validated here for type, shape and range (a bad value answers 400 naming the
field); the rest (unsupported features, the context length, empty prompts) is checked by the
handlers. Fields OpenAI defines that kiln ignores (``user``, ``parallel_tool_calls``...) are
accepted, and unknown fields are ignored, as vLLM does, so clients sending newer parameters
still work.

The OpenAPI schema says what is accepted: an optional field takes ``null`` for its default, as
OpenAI's do (its client sends ``null`` for a parameter given as ``None``), and the handlers'
checks are documented there too (``_documented``, ``WithJsonSchema``), while their messages
and ``param`` stay the handlers'. Only what depends on the model or on another field (the
context, ``min_tokens`` <= ``max_tokens``, ``top_logprobs`` without ``logprobs``...) is left
unsaid.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from kiln.sampling import MAX_TOP_LOGPROBS

MAX_CHOICES = 128
"""The most choices (``n``, times the prompts of a completion) one request may ask for."""

_T = TypeVar("_T")


class _NullMeansDefault:
    """Marks a field whose ``null`` means "not given": the OpenAPI schema admits ``null``, and
    validation drops it (``_Request._null_means_not_given``), so the attribute keeps its type
    and default, and the field stays out of ``model_fields_set`` (where the handlers look for
    a value that overrides the checkpoint's ``generation_config.json``)."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [handler(core_schema), {"type": "null"}]}


OrNull = Annotated[_T, _NullMeansDefault()]
"""``n: OrNull[int] = Field(default=1)``: an ``int``; ``null`` means 1, as absent does."""


def _documented(branch: str | None = None, **keywords: Any) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` documenting a check the handlers (or ``SamplingParams``) make
    with their own message and ``param``: it adds ``keywords`` to the non-null branches of the
    field's schema (only the ``branch`` one, e.g. ``"array"``, if given); validation is
    unchanged."""

    def extra(schema: dict[str, Any]) -> None:
        for option in schema.get("anyOf", [schema]):
            if option.get("type") != "null" and branch in (None, option.get("type")):
                option.update(copy.deepcopy(keywords))

    return extra


class _Request(BaseModel):
    # NOTE: strict, as OpenAI's API is: `"max_tokens": "16"`, `"logprobs": true` where a
    # number is due, or `5.0` for an integer are refused (400), not silently converted.
    model_config = ConfigDict(extra="ignore", strict=True)

    _or_null_fields: ClassVar[frozenset[str]] = frozenset()
    """The model's ``OrNull`` fields."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._or_null_fields = frozenset(
            name
            for name, field in cls.model_fields.items()
            if any(isinstance(m, _NullMeansDefault) for m in field.metadata)
        )

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data: Any) -> Any:
        or_null = cls._or_null_fields
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in or_null):
            return {k: v for k, v in data.items() if not (v is None and k in or_null)}
        return data

    @field_validator("*")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        _check_unicode(value)
        return value


def _check_unicode(value: Any) -> None:
    """Refuse lone surrogates (JSON's ``"\\ud800"`` escapes decode to them): no tokenizer
    takes them, and no response could carry them back as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode: {e.reason} at position {e.start}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


class StreamOptions(_Request):
    include_usage: OrNull[bool] = False
    """Send a last chunk with the request's ``usage`` and no choices."""


class SamplingFields(_Request):
    """Parameters chat and text completions share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    """Must name the served model (``GET /v1/models``); see ``handlers.check_model``."""
    max_tokens: int | None = Field(default=None, ge=1)
    n: OrNull[int] = Field(default=1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Default 1.0; 0 is greedy."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(
        default=None,
        json_schema_extra=_documented("array", items={"type": "string", "minLength": 1}),
    )
    """A string (``""``: none) or strings that end generation; ``SamplingParams`` refuses an
    empty one in a list."""
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    frequency_penalty: OrNull[float] = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: OrNull[float] = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description="Not supported: only null or {}.",
        json_schema_extra=_documented(maxProperties=0),
    )
    user: str | None = None
    stream: OrNull[bool] = False
    stream_options: StreamOptions | None = None
    """Only with ``stream: true``."""
    # vLLM's extra sampling parameters.
    top_k: int | None = Field(default=None, ge=-1)
    """-1 or 0 disables."""
    min_p: OrNull[float] = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: OrNull[float] = Field(default=1.0, gt=0.0)
    ignore_eos: OrNull[bool] = False
    min_tokens: OrNull[int] = Field(default=0, ge=0)
    """At most the completion's ``max_tokens``."""
    stop_token_ids: list[int] | None = Field(
        default=None, json_schema_extra=_documented(items={"type": "integer", "minimum": 0})
    )
    skip_special_tokens: OrNull[bool] = True


_MESSAGE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool", "function", "ipython"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                        "required": ["type", "text"],
                    },
                },
            ]
        },
        "name": {"type": ["string", "null"]},
    },
    "required": ["role", "content"],
}
"""One chat message as documented (an assistant message may also carry ``tool_calls`` and
no content; tool roles reach only templates that know them)."""

_RESPONSE_FORMAT = {
    "anyOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}},
        {"type": "null"},
    ],
    "description": 'Only text (`{"type": "text"}`, the default) is supported.',
}

_TOKEN_IDS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0},
    "minItems": 1,
}
_PROMPT = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": MAX_CHOICES,
        },
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_CHOICES},
    ],
    "description": "A text, texts, token ids (each below the model's vocabulary size) or lists "
    "of them; none empty. At most 128 choices in all: the prompts times `n`.",
}
"""What ``handlers._completion_prompts`` accepts (it refuses the rest, ``param: prompt``)."""


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1, json_schema_extra={"items": _MESSAGE})
    """Checked in depth (roles, content parts) by ``kiln.text.chat_template.validate_messages``;
    the OpenAPI schema documents what it accepts."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    logprobs: OrNull[bool] = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Only with ``logprobs: true`` (0 is fine without)."""
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema(_RESPONSE_FORMAT)] = None
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        description="Not supported (no tool calling): only null or [].",
        json_schema_extra=_documented(maxItems=0),
    )
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        WithJsonSchema({"enum": ["none", "auto", None], "description": "No tool is called."}),
    ] = None
    functions: list[dict[str, Any]] | None = Field(
        default=None,
        description="Not supported (no function calling): only null or [].",
        json_schema_extra=_documented(maxItems=0),
    )
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (the legacy text API)."""

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_PROMPT)]
    """NOTE: not nullable, unlike OpenAI's (null there means ``<|endoftext|>``), as vLLM."""
    max_tokens: int | None = Field(default=16, ge=1)
    """OpenAI's (and vLLM's) default is 16 tokens here; null means the rest of the context."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Return the chosen token's logprob and this many most likely alternatives."""
    echo: OrNull[bool] = False
    """Not with ``logprobs`` (prompt logprobs are not computed)."""
    suffix: str | None = Field(
        default=None,
        description="Not supported: only null or an empty string.",
        json_schema_extra=_documented(maxLength=0),
    )
    best_of: int | None = Field(
        default=None,
        ge=1,
        description="Only 1: use `n` for several choices.",
        json_schema_extra=_documented(maximum=1),
    )
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema(_RESPONSE_FORMAT)] = None
    """Only text; checked by the handler, as for chat."""


# --- responses ------------------------------------------------------------------------------

FinishReasonLiteral = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    root: str
    max_model_len: int
    sampling_defaults: dict[str, float | int] = Field(default_factory=dict)
    """kiln's addition: the sampling values the model's ``generation_config.json`` sets, used
    for the fields a request leaves out (or sends as ``null``); OpenAI's defaults otherwise."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonLiteral | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonLiteral | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists over the tokens of a choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonLiteral | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIErrorResponse(BaseModel):
    """Every error answer of ``/v1/...`` (and an error event of a stream that already began).

    NOTE: not ``ErrorResponse``: OpenAPI names components after classes, and TGI has one."""

    error: ErrorInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
