"""Wire schemas of the OpenAI-compatible API (``/v1/...``), as vLLM serves it.

Requests are validated here for type, shape and range (a bad value answers 400 naming the
field); what a schema cannot say (unsupported features, context length) is checked by the
handlers. Fields OpenAI defines that kiln ignores (``user``, ``parallel_tool_calls``...) are
accepted, and unknown fields are ignored, as vLLM does, so clients sending newer parameters
still work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.sampling import MAX_TOP_LOGPROBS

MAX_CHOICES = 128
"""The most choices (``n``, times the prompts of a completion) one request may ask for."""


class _Request(BaseModel):
    # NOTE: strict, as OpenAI's API is: `"max_tokens": "16"`, `"logprobs": true` where a
    # number is due, or `5.0` for an integer are refused (400), not silently converted.
    model_config = ConfigDict(extra="ignore", strict=True)

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
    include_usage: bool = False
    """Send a last chunk with the request's ``usage`` and no choices."""


class SamplingFields(_Request):
    """Parameters chat and text completions share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    """Must name the served model (``GET /v1/models``); see ``handlers.check_model``."""
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Default 1.0; 0 is greedy."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters.
    top_k: int | None = Field(default=None, ge=-1)
    """-1 or 0 disables."""
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True


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
        "name": {"type": "string"},
    },
    "required": ["role", "content"],
}
"""One chat message as documented (an assistant message may also carry ``tool_calls`` and
no content; tool roles reach only templates that know them)."""


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1, json_schema_extra={"items": _MESSAGE})
    """Checked in depth (roles, content parts) by ``kiln.text.chat_template.validate_messages``;
    the OpenAPI schema documents what it accepts."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (the legacy text API)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    """OpenAI's (and vLLM's) default is 16 tokens here; null means the rest of the context."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Return the chosen token's logprob and this many most likely alternatives."""
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


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
