"""The conversation store of the web chat: conversations and their message trees in SQLite,
behind :class:`ChatStore`. Knows nothing of the engine or of HTTP."""

from kiln.store.records import (
    Conversation,
    GenerationSettings,
    Message,
    MessageStatus,
    Role,
    SearchHit,
)
from kiln.store.sqlite import ChatStore

__all__ = [
    "ChatStore",
    "Conversation",
    "GenerationSettings",
    "Message",
    "MessageStatus",
    "Role",
    "SearchHit",
]
