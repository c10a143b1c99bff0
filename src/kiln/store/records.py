"""What the conversation store holds: conversations, their messages (a tree) and settings.

Plain frozen records, validated on construction, so that nothing out of range ever reaches a
row. Nothing here knows the engine: generation settings are numbers the web app turns into
sampling parameters.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kiln.errors import InvalidRequestError

MAX_TITLE_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 100_000
MAX_CONTENT_CHARS = 1_000_000


class Role(str, enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


class MessageStatus(str, enum.Enum):
    """Where a message's content stands.

    ``streaming`` while an answer is generated; then ``complete``, ``stopped`` (the user
    stopped it: the content is what was generated so far), ``error`` (generation failed) or
    ``interrupted`` (the server went away mid-answer, found at the next start).
    """

    COMPLETE = "complete"
    STREAMING = "streaming"
    STOPPED = "stopped"
    ERROR = "error"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class GenerationSettings:
    """A conversation's generation parameters; None means "the model's default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        _check_number(self.temperature, "temperature", 0.0, 100.0, float)
        _check_number(self.top_p, "top_p", 0.0, 1.0, float, low_open=True)
        _check_number(self.top_k, "top_k", 0, 1_000_000, int)
        _check_number(self.max_new_tokens, "max_new_tokens", 1, 1_000_000, int)
        _check_number(self.repetition_penalty, "repetition_penalty", 0.0, 100.0, float, True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GenerationSettings:
        data = data or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidRequestError(f"unknown generation settings: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_number(
    value: Any, name: str, low: float, high: float, kind: type, low_open: bool = False
) -> None:
    """``value`` is None or a ``kind`` within ``[low, high]`` (``(low, high]`` if open)."""
    if value is None:
        return
    # NOTE: bool is an int in Python; True as a top_k is a client bug, not the number 1.
    numeric = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise InvalidRequestError(f"{name} must be {'a number' if kind is float else 'an integer'}")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidRequestError(f"{name} must be in {bracket}{low}, {high}], got {value}")


def check_text(value: str, name: str, max_chars: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string")
    if not allow_empty and not value.strip():
        raise InvalidRequestError(f"{name} must not be empty")
    if len(value) > max_chars:
        raise InvalidRequestError(f"{name} is over {max_chars} characters")
    if "\x00" in value:
        raise InvalidRequestError(f"{name} must not contain NUL characters")
    return value


@dataclass(frozen=True)
class Conversation:
    id: str
    owner: str
    title: str
    created_at: float
    updated_at: float
    system_prompt: str = ""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    current_leaf_id: str | None = None
    """The last message of the branch shown (None: no message yet)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["owner"]  # an owner id is a credential: never echoed back
        return data


@dataclass(frozen=True)
class Message:
    id: str
    conversation_id: str
    parent_id: str | None
    """The message this one answers or follows; None for a first message (several first
    messages are siblings, as edits of the first question)."""
    role: Role
    content: str
    status: MessageStatus
    created_at: float
    model: str | None = None
    """The model that wrote it (assistant messages)."""
    error: str | None = None
    truncated: bool = False
    """The history sent with it was cut to fit the context (oldest exchanges dropped)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["role"] = self.role.value
        data["status"] = self.status.value
        return data


@dataclass(frozen=True)
class SearchHit:
    conversation_id: str
    conversation_title: str
    message_id: str
    role: Role
    snippet: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["role"] = self.role.value
        return data
