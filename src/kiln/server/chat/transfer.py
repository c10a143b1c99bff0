"""Export and import of conversations: JSON (lossless) and Markdown (readable).

JSON keeps everything a conversation is: the whole message tree (every branch, ``parent_id``
links), the branch shown, the system prompt, the generation settings, and for each message its
role, status, the model that wrote it, any error, whether its history was cut, and when::

    {"format": "kiln.chat", "version": 1, "exported_at": 1764590000.0,
     "conversations": [{"id", "title", "system_prompt", "settings", "current_leaf_id",
                        "created_at", "updated_at", "messages": [{"id", "parent_id", "role",
                        "content", "status", "model", "error", "truncated", "created_at"}]}]}

Importing such a file makes new conversations (new ids, the tree's links following them) owned
by whoever imports it. Markdown is the branch shown, as a person reads it; it is not imported.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.errors import InvalidRequestError
from kiln.server.chat.schemas import Settings
from kiln.store import Conversation, GenerationSettings, Message, MessageStatus, Role
from kiln.store.records import MAX_CONTENT_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS

FORMAT = "kiln.chat"
VERSION = 1
MAX_CONVERSATIONS = 1000
MAX_MESSAGES = 20_000
_ID = Field(min_length=1, max_length=64)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _timestamp(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite Unix time")
    return value


class ExportedMessage(_Strict):
    id: str = _ID
    parent_id: str | None = Field(None, max_length=64)
    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)
    status: Literal["complete", "streaming", "stopped", "error", "interrupted"] = "complete"
    model: str | None = Field(None, max_length=500)
    error: str | None = Field(None, max_length=10_000)
    truncated: bool = False
    created_at: float

    _check_time = field_validator("created_at")(_timestamp)


class ExportedConversation(_Strict):
    id: str | None = Field(None, max_length=64)
    """The id it had where it was exported (informative: an import makes a new one)."""
    title: str = Field("New chat", max_length=MAX_TITLE_CHARS)
    system_prompt: str = Field("", max_length=MAX_SYSTEM_PROMPT_CHARS)
    settings: Settings = Field(default_factory=Settings)
    current_leaf_id: str | None = Field(None, max_length=64)
    created_at: float
    updated_at: float
    messages: list[ExportedMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)

    _check_times = field_validator("created_at", "updated_at")(_timestamp)


class ExportFile(_Strict):
    format: str
    version: int
    exported_at: float | None = None
    conversations: list[ExportedConversation] = Field(min_length=1, max_length=MAX_CONVERSATIONS)


def parse_import(data: Any) -> ExportFile:
    """An uploaded export, checked whole (422 with the first problem's place otherwise)."""
    # NOTE: format and version first: a file of another format or version would otherwise be
    # refused for a field it names differently, which says nothing useful.
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidRequestError(f'not a kiln chat export: its "format" must be "{FORMAT}"')
    if data.get("version") != VERSION:
        raise InvalidRequestError(
            f"kiln chat export version {data.get('version')!r} is not one this kiln reads "
            f"({VERSION}): export it again from this kiln, or upgrade kiln",
            param="version",
        )
    try:
        return ExportFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(f"{where}: {first['msg']}", param=where or None) from e


# --- export -----------------------------------------------------------------------------------


def export_file(conversations: list[tuple[Conversation, list[Message]]]) -> dict[str, Any]:
    """The JSON document of ``conversations``, each with every message of its tree."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": time.time(),
        "conversations": [_conversation(c, messages) for c, messages in conversations],
    }


def _conversation(conversation: Conversation, messages: list[Message]) -> dict[str, Any]:
    data = conversation.to_dict()  # without the owner: an owner id is a credential
    data["messages"] = [_message(m) for m in messages]
    return data


def _message(message: Message) -> dict[str, Any]:
    data = message.to_dict()
    del data["conversation_id"]  # the conversation it is listed in
    return data


def to_records(
    document: ExportFile,
) -> list[tuple[Conversation, list[Message]]]:
    """The conversations of an import, as the store's records (ids still the file's)."""
    out = []
    for item in document.conversations:
        conversation = Conversation(
            id=item.id or "",
            owner="",
            title=item.title,
            created_at=item.created_at,
            updated_at=item.updated_at,
            system_prompt=item.system_prompt,
            settings=GenerationSettings(**item.settings.model_dump()),
            current_leaf_id=item.current_leaf_id,
        )
        messages = [
            Message(
                id=m.id,
                conversation_id=conversation.id,
                parent_id=m.parent_id,
                role=Role(m.role),
                content=m.content,
                status=MessageStatus(m.status),
                created_at=m.created_at,
                model=m.model,
                error=m.error,
                truncated=m.truncated,
            )
            for m in item.messages
        ]
        out.append((conversation, messages))
    return out


def to_markdown(conversation: Conversation, branch: list[Message]) -> str:
    """The branch shown, readable: a heading per message, the model that wrote each answer,
    what did not end normally said in words."""
    lines = [f"# {_one_line(conversation.title)}", ""]
    when = datetime.fromtimestamp(conversation.created_at, timezone.utc)
    lines.append(f"- Started: {when:%Y-%m-%d %H:%M} UTC")
    models = sorted({m.model for m in branch if m.model})
    if models:
        lines.append(f"- Model{'s' if len(models) > 1 else ''}: {', '.join(models)}")
    chosen = {k: v for k, v in conversation.settings.to_dict().items() if v is not None}
    if chosen:
        lines.append("- Settings: " + ", ".join(f"{k} {v}" for k, v in chosen.items()))
    lines.append("")
    if conversation.system_prompt.strip():
        lines += ["## System prompt", "", conversation.system_prompt.strip(), ""]
    for message in branch:
        if message.role is Role.USER:
            heading = "## User"
        else:
            heading = "## Assistant" + (f" ({_one_line(message.model)})" if message.model else "")
        if message.status not in (MessageStatus.COMPLETE, MessageStatus.STREAMING):
            heading += f" [{message.status.value}]"
        lines += [heading, ""]
        if message.truncated:
            lines += ["*(The oldest messages were left out of its history to fit the model.)*", ""]
        lines.append(message.content.strip() or "*(no text)*")
        if message.error:
            lines += ["", f"*Error: {_one_line(message.error)}*"]
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def filename(conversation: Conversation, suffix: str) -> str:
    """An ASCII file name for a download of ``conversation`` (a header can carry no more)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", conversation.title).strip("-").lower()[:50]
    return f"kiln-chat-{slug or 'conversation'}{suffix}"
