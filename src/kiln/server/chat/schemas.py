"""Request bodies of the web chat API (wire schemas: they live in ``server/`` only).

Unknown fields are refused (a typo in a setting is an error, not a silent default); the
store checks ranges and lengths again, so nothing out of range is ever written.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kiln.store.records import MAX_CONTENT_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS


class Settings(BaseModel):
    """Generation parameters; null (or left out) means the model's default."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000)
    repetition_penalty: float | None = Field(None, gt=0, le=100)


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field("New chat", max_length=MAX_TITLE_CHARS)
    system_prompt: str = Field("", max_length=MAX_SYSTEM_PROMPT_CHARS)
    settings: Settings = Field(default_factory=Settings)


class ConversationChanges(BaseModel):
    """What to change; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=MAX_TITLE_CHARS)
    system_prompt: str | None = Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    settings: Settings | None = None
    current_leaf_id: str | None = Field(None, max_length=64)
    """The last message of the branch to show."""


class NewMessage(BaseModel):
    """A user message, answered at once (the answer streams back).

    ``parent_id`` is the assistant message it follows; null starts the conversation over (an
    edit of the first question); left out, it follows the branch shown. Editing a message
    and sending it again is a new message with the edited one's parent: a sibling.
    """

    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, max_length=MAX_CONTENT_CHARS)
    parent_id: str | None = Field(None, max_length=64)
