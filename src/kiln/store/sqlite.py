"""ChatStore: conversations and their message trees in one SQLite file.

Every method takes the ``owner`` the caller acts for: a conversation of another owner is
reported exactly like one that does not exist (:class:`NotFoundError`), so nothing tells one
owner what another has. Each write is one transaction: a crash leaves the previous state or
the next, never half of one. The file runs in WAL mode (readers never wait for the writer).

NOTE: one connection behind a lock, called from the event loop: each statement here touches
a handful of rows of a local file (well under a millisecond), cheaper than a thread hop.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import InvalidRequestError, NotFoundError
from kiln.store.migrations import migrate
from kiln.store.records import (
    MAX_CONTENT_CHARS,
    MAX_SYSTEM_PROMPT_CHARS,
    MAX_TITLE_CHARS,
    Conversation,
    GenerationSettings,
    Message,
    MessageStatus,
    Role,
    SearchHit,
    check_text,
)

DEFAULT_TITLE = "New chat"
_UNSET: Any = object()


class ChatStore:
    """The conversation repository over a SQLite file (created, and migrated, on open).

    Messages form a tree per conversation: a user message follows an assistant message (or
    starts the conversation), an assistant message answers a user message; messages with the
    same parent are siblings (regenerations, edits), in the order they were made.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: isolation_level=None: transactions are explicit (see _transaction), so none
        # is left open by the driver between calls.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA busy_timeout = 5000")
        migrate(self._db)
        self.num_interrupted = self._mark_interrupted()
        """Answers found mid-generation at open (the last server stopped during them)."""

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _mark_interrupted(self) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'"
            )
            return cursor.rowcount

    # --- conversations ---------------------------------------------------------------------

    def create_conversation(
        self,
        owner: str,
        title: str = DEFAULT_TITLE,
        system_prompt: str = "",
        settings: GenerationSettings | None = None,
    ) -> Conversation:
        _check_owner(owner)
        title = _clean_title(title)
        check_text(system_prompt, "system_prompt", MAX_SYSTEM_PROMPT_CHARS)
        settings = settings or GenerationSettings()
        now = time.time()
        conversation_id = uuid.uuid4().hex
        with self._transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, title, system_prompt, settings, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    owner,
                    title,
                    system_prompt,
                    json.dumps(settings.to_dict()),
                    now,
                    now,
                ),
            )
        return self.conversation(owner, conversation_id)

    def conversations(self, owner: str, limit: int = 1000) -> list[Conversation]:
        """The owner's conversations, the most recently active first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM conversations WHERE owner = ? "
                "ORDER BY updated_at DESC, rowid DESC LIMIT ?",
                (owner, limit),
            ).fetchall()
        return [_conversation(row) for row in rows]

    def conversation(self, owner: str, conversation_id: str) -> Conversation:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no conversation {conversation_id!r}")
        return _conversation(row)

    def update_conversation(
        self,
        owner: str,
        conversation_id: str,
        *,
        title: str = _UNSET,
        system_prompt: str = _UNSET,
        settings: GenerationSettings = _UNSET,
        current_leaf_id: str = _UNSET,
    ) -> Conversation:
        """Change what is given. ``current_leaf_id`` selects the branch shown: it must be a
        message of this conversation. Selecting a branch does not make the conversation
        newer; a change of title, prompt or settings does not either (only messages do)."""
        changes: dict[str, Any] = {}
        if title is not _UNSET:
            changes["title"] = _clean_title(title)
        if system_prompt is not _UNSET:
            changes["system_prompt"] = check_text(
                system_prompt, "system_prompt", MAX_SYSTEM_PROMPT_CHARS
            )
        if settings is not _UNSET:
            changes["settings"] = json.dumps(settings.to_dict())
        with self._transaction() as db:
            self._owned(db, owner, conversation_id)
            if current_leaf_id is not _UNSET:
                self._message_row(db, conversation_id, current_leaf_id)
                changes["current_leaf_id"] = current_leaf_id
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)
                db.execute(
                    f"UPDATE conversations SET {assignments} WHERE id = ?",
                    (*changes.values(), conversation_id),
                )
        return self.conversation(owner, conversation_id)

    def delete_conversation(self, owner: str, conversation_id: str) -> None:
        with self._transaction() as db:
            self._owned(db, owner, conversation_id)
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # --- messages -------------------------------------------------------------------------

    def messages(self, owner: str, conversation_id: str) -> list[Message]:
        """Every message of the conversation (all branches), oldest first."""
        with self._lock:
            self._owned(self._db, owner, conversation_id)
            rows = self._db.execute(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            ).fetchall()
        return [_message(row) for row in rows]

    def message(self, owner: str, conversation_id: str, message_id: str) -> Message:
        with self._lock:
            self._owned(self._db, owner, conversation_id)
            return _message(self._message_row(self._db, conversation_id, message_id))

    def branch(self, owner: str, conversation_id: str, leaf_id: str | None) -> list[Message]:
        """The messages from the first one down to ``leaf_id`` (empty for None)."""
        if leaf_id is None:
            with self._lock:
                self._owned(self._db, owner, conversation_id)
            return []
        with self._lock:
            self._owned(self._db, owner, conversation_id)
            self._message_row(self._db, conversation_id, leaf_id)
            rows = self._db.execute(
                """
                WITH RECURSIVE up (id, parent_id, depth) AS (
                    SELECT id, parent_id, 0 FROM messages
                        WHERE conversation_id = :conversation AND id = :leaf
                    UNION ALL
                    SELECT m.id, m.parent_id, up.depth + 1 FROM messages AS m
                        JOIN up ON m.id = up.parent_id AND m.conversation_id = :conversation
                )
                SELECT messages.* FROM up JOIN messages USING (id) ORDER BY up.depth DESC
                """,
                {"conversation": conversation_id, "leaf": leaf_id},
            ).fetchall()
        return [_message(row) for row in rows]

    def add_message(
        self,
        owner: str,
        conversation_id: str,
        parent_id: str | None,
        role: Role,
        content: str,
        status: MessageStatus = MessageStatus.COMPLETE,
        model: str | None = None,
        truncated: bool = False,
    ) -> Message:
        """Add a message under ``parent_id`` and make it the branch shown.

        A user message must start the conversation or follow an assistant message; an
        assistant message must answer a user message.
        """
        role = Role(role)
        check_text(content, "content", MAX_CONTENT_CHARS, allow_empty=role is Role.ASSISTANT)
        message_id = uuid.uuid4().hex
        now = time.time()
        with self._transaction() as db:
            self._owned(db, owner, conversation_id)
            parent = (
                None if parent_id is None else self._message_row(db, conversation_id, parent_id)
            )
            _check_parent(role, parent)
            db.execute(
                "INSERT INTO messages (id, conversation_id, parent_id, role, content, status, "
                "model, truncated, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message_id,
                    conversation_id,
                    parent_id,
                    role.value,
                    content,
                    MessageStatus(status).value,
                    model,
                    int(truncated),
                    now,
                ),
            )
            db.execute(
                "UPDATE conversations SET current_leaf_id = ?, updated_at = ? WHERE id = ?",
                (message_id, now, conversation_id),
            )
        return self.message(owner, conversation_id, message_id)

    def update_message(
        self,
        message_id: str,
        content: str,
        status: MessageStatus,
        error: str | None = None,
        truncated: bool | None = None,
    ) -> None:
        """Record an answer's progress or end (the content so far and its status).

        Owner-free: only the server's own generation calls it, on a message it made.
        """
        check_text(content, "content", MAX_CONTENT_CHARS)
        with self._transaction() as db:
            # NOTE: no row to update when the conversation was deleted mid-answer: fine.
            db.execute(
                "UPDATE messages SET content = ?, status = ?, error = ?, "
                "truncated = COALESCE(?, truncated) WHERE id = ?",
                (
                    content,
                    MessageStatus(status).value,
                    error,
                    None if truncated is None else int(truncated),
                    message_id,
                ),
            )

    # --- search ---------------------------------------------------------------------------

    def search(self, owner: str, query: str, limit: int = 50) -> list[SearchHit]:
        """Messages of the owner's conversations that contain every word of ``query``,
        best match first."""
        match = _fts_query(query)
        if match is None:
            return []
        with self._lock:
            rows = self._db.execute(
                """
                SELECT m.conversation_id, c.title, m.id, m.role, m.created_at,
                       snippet(messages_fts, 0, '', '', '…', 16) AS snippet
                FROM messages_fts
                JOIN messages AS m ON m.seq = messages_fts.rowid
                JOIN conversations AS c ON c.id = m.conversation_id
                WHERE messages_fts MATCH ? AND c.owner = ?
                ORDER BY rank LIMIT ?
                """,
                (match, owner, limit),
            ).fetchall()
        return [
            SearchHit(
                conversation_id=row[0],
                conversation_title=row[1],
                message_id=row[2],
                role=Role(row[3]),
                created_at=row[4],
                snippet=row[5],
            )
            for row in rows
        ]

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _owned(db: sqlite3.Connection, owner: str, conversation_id: str) -> None:
        found = db.execute(
            "SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
        ).fetchone()
        if found is None:
            raise NotFoundError(f"no conversation {conversation_id!r}")

    @staticmethod
    def _message_row(db: sqlite3.Connection, conversation_id: str, message_id: str) -> sqlite3.Row:
        row = db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? AND id = ?",
            (conversation_id, message_id),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no message {message_id!r} in this conversation")
        return row


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner:
        raise InvalidRequestError("an owner id is required")


def _clean_title(title: str) -> str:
    check_text(title, "title", MAX_TITLE_CHARS)
    title = " ".join(title.split())  # one line: titles are shown in a list
    return title or DEFAULT_TITLE


def _check_parent(role: Role, parent: sqlite3.Row | None) -> None:
    if role is Role.ASSISTANT:
        if parent is None or parent["role"] != Role.USER.value:
            raise InvalidRequestError("an assistant message must answer a user message")
    elif parent is not None and parent["role"] != Role.ASSISTANT.value:
        raise InvalidRequestError(
            "a user message must start the conversation or follow an assistant message"
        )


def _fts_query(query: str) -> str | None:
    """``query`` as an FTS5 expression matching every word, each quoted so that nothing the
    user types is read as FTS5 syntax (``AND``, ``*``, ``"``, column filters)."""
    if not isinstance(query, str):
        raise InvalidRequestError("a search query must be a string")
    words = query.replace("\x00", " ").split()
    if not words:
        return None
    return " ".join('"' + word.replace('"', '""') + '"' for word in words[:32])


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        owner=row["owner"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        system_prompt=row["system_prompt"],
        settings=GenerationSettings.from_dict(json.loads(row["settings"])),
        current_leaf_id=row["current_leaf_id"],
    )


def _message(row: sqlite3.Row) -> Message:
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        parent_id=row["parent_id"],
        role=Role(row["role"]),
        content=row["content"],
        status=MessageStatus(row["status"]),
        created_at=row["created_at"],
        model=row["model"],
        error=row["error"],
        truncated=bool(row["truncated"]),
    )
