"""The conversation store of the web chat: conversations and their message trees in SQLite or
PostgreSQL (SQLAlchemy Core, Alembic migrations), behind :class:`ChatStore`. Knows nothing of
the engine or of HTTP."""

from kiln.store.records import (
    Conversation,
    GenerationSettings,
    Message,
    MessageStatus,
    Role,
    SearchHit,
)
from kiln.store.repository import DEFAULT_TITLE, ChatStore

__all__ = [
    "DEFAULT_TITLE",
    "ChatStore",
    "Conversation",
    "GenerationSettings",
    "Message",
    "MessageStatus",
    "Role",
    "SearchHit",
]
