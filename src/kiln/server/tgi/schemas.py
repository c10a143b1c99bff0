"""Text Generation Inference's wire schemas (its OpenAPI ``components/schemas``).

Requests are parsed strictly (no ``"0.5"`` for a number, no ``1`` for a boolean), as TGI's serde
does; unknown fields are ignored, as serde does. Range checks live in the handlers
(``validation.py``), so they can answer with TGI's own messages; the OpenAPI schema documents
them (each request model's ``_limits``), as TGI's own does, without checking them a second time.
Responses skip the fields TGI skips when empty (``top_tokens``, ``best_of_sequences``,
``details`` of ``/generate``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# NOTE: validation.py's limits, repeated here as it imports this module; the schema contract
# test checks they agree.
_MAX_BEST_OF = 1
_MAX_STOP_SEQUENCES = 4
_MAX_TOP_N_TOKENS = 5
_MAX_SEED = 2**64 - 1
_ONLY_NULL = {"type": "null", "description": "Not supported: only null."}


def _document_limits(schema: dict[str, Any], cls: type[Any]) -> None:
    """Adds ``cls._limits`` (JSON Schema keywords per field) to the non-null branch of each
    field's schema (``_ONLY_NULL`` replaces it): what ``validation.py`` accepts, documented
    without being checked here."""
    for name, keywords in cls._limits.items():
        field = schema["properties"][name]
        if keywords is _ONLY_NULL:
            field.pop("anyOf", None)
            field.update(keywords)
            continue
        for option in field.get("anyOf", [field]):
            if option.get("type") != "null":
                option.update(copy.deepcopy(keywords))


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=_document_limits)

    _limits: ClassVar[dict[str, dict[str, Any]]] = {}


class GenerateParameters(_Request):
    """Generation parameters. ``None`` means "not set" (TGI's ``Option``)."""

    adapter_id: str | None = None
    """LoRA adapter (not supported: setting it is an error)."""
    best_of: int | None = None
    """Only 1 is supported."""
    decoder_input_details: bool = False
    """Return the prompt tokens (``details.prefill``)."""
    details: bool = False
    """Return ``details`` (finish reason, tokens with logprobs...)."""
    do_sample: bool = False
    """Sample; also implied by temperature != 1, top_k, top_p or typical_p."""
    frequency_penalty: float | None = None
    """In [-2, 2]."""
    grammar: Any = None
    """Constrained generation (not supported: setting it is an error)."""
    max_new_tokens: int | None = 100
    """Tokens to generate; ``null`` means all the room left in ``max_total_tokens``."""
    repetition_penalty: float | None = None
    """> 0; 1.0 means no penalty."""
    return_full_text: bool | None = None
    """Prepend ``inputs`` to ``generated_text``."""
    seed: int | None = None
    """Seed of the sampler (random when sampling without one)."""
    stop: list[str] = Field(default_factory=list)
    """Up to ``max_stop_sequences`` strings that end generation (kept in the text, as TGI)."""
    temperature: float | None = None
    """> 0."""
    top_k: int | None = None
    """> 0."""
    top_n_tokens: int | None = None
    """0..``max_top_n_tokens`` most likely alternatives per generated token."""
    top_p: float | None = None
    """In (0, 1)."""
    truncate: int | None = None
    """Keep only the last ``truncate`` prompt tokens."""
    typical_p: float | None = None
    """In (0, 1)."""
    watermark: bool = False
    """Not supported: true is an error."""

    # Only `truncate`'s upper bound (the server's max_input_tokens) and those depending on the
    # prompt or the route (`max_new_tokens` + prompt tokens, `decoder_input_details` when
    # streaming) are left unsaid.
    _limits: ClassVar[dict[str, dict[str, Any]]] = {
        "adapter_id": _ONLY_NULL,
        "best_of": {"minimum": _MAX_BEST_OF, "maximum": _MAX_BEST_OF},
        "frequency_penalty": {"minimum": -2.0, "maximum": 2.0},
        "grammar": _ONLY_NULL,
        "max_new_tokens": {"minimum": 1},
        "repetition_penalty": {"exclusiveMinimum": 0.0},
        "seed": {"minimum": 0, "maximum": _MAX_SEED},
        "stop": {"maxItems": _MAX_STOP_SEQUENCES},
        "temperature": {"exclusiveMinimum": 0.0},
        "top_k": {"minimum": 1},
        "top_n_tokens": {"minimum": 0, "maximum": _MAX_TOP_N_TOKENS},
        "top_p": {"exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0},
        "truncate": {"minimum": 1},
        "typical_p": {"exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0},
        "watermark": {"const": False, "description": "Not supported: only false."},
    }


class GenerateRequest(_Request):
    inputs: str
    parameters: GenerateParameters | None = None
    """Absent or null: TGI's defaults for a request without parameters (sampling on)."""

    _limits: ClassVar[dict[str, dict[str, Any]]] = {"inputs": {"minLength": 1}}


class TokenizeParameters(GenerateParameters):
    """``parameters`` as ``POST /tokenize`` reads them: only ``truncate`` (the others are
    parsed, as TGI does, but not checked)."""

    _limits: ClassVar[dict[str, dict[str, Any]]] = {"truncate": {"minimum": 1}}


class TokenizeRequest(GenerateRequest):
    """``POST /tokenize``'s body: a ``GenerateRequest`` whose schema documents what tokenizing
    checks (``inputs`` may be empty, only ``truncate`` is range-checked)."""

    parameters: TokenizeParameters | None = None

    _limits: ClassVar[dict[str, dict[str, Any]]] = {}


class CompatGenerateRequest(GenerateRequest):
    """``POST /``: ``/generate`` or ``/generate_stream`` depending on ``stream``."""

    stream: bool | None = False


# --- responses ----------------------------------------------------------------------------


class _Response(BaseModel):
    _skip_when_empty: ClassVar[tuple[str, ...]] = ()

    # NOTE: no return annotation: with one, pydantic documents every response as a bare
    # `object` in the OpenAPI schema; without, it documents the fields.
    @model_serializer(mode="wrap")
    def _skip_empty(self, handler: Any):
        data = handler(self)
        for name in self._skip_when_empty:
            if not data.get(name):
                data.pop(name, None)
        return data


class Token(_Response):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(_Response):
    id: int
    text: str
    logprob: float | None
    """Always null here: kiln does not compute prompt log-probabilities (TGI: null for the
    first token only)."""


class Details(_Response):
    _skip_when_empty: ClassVar[tuple[str, ...]] = ("best_of_sequences", "top_tokens")

    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default_factory=list)
    best_of_sequences: list[Any] | None = None


class GenerateResponse(_Response):
    _skip_when_empty: ClassVar[tuple[str, ...]] = ("details",)

    generated_text: str
    details: Details | None = None


class StreamDetails(_Response):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(_Response):
    _skip_when_empty: ClassVar[tuple[str, ...]] = ("top_tokens",)

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(_Response):
    id: int
    text: str
    start: int
    stop: int


class ErrorResponse(_Response):
    error: str
    error_type: str


class Info(_Response):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_input_length: int
    """The pre-2.1 name of ``max_input_tokens``, for older clients."""
    max_total_tokens: int
    max_top_n_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    sampling_defaults: dict[str, float | int] = Field(default_factory=dict)
    """kiln's addition: the sampling values the model's ``generation_config.json`` sets, used
    for the fields a request leaves out (``max_new_tokens`` always; the warpers when it
    samples)."""
