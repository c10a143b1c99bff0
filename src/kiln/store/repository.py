"""ChatStore: the conversation repository, on SQLite or PostgreSQL through SQLAlchemy Core.

Every method takes the ``owner`` the caller acts for: a conversation of another owner is
reported exactly like one that does not exist (:class:`NotFoundError`), so nothing tells one
owner what another has. Each write is one transaction: a crash leaves the previous state or
the next, never half of one.

NOTE: synchronous, called from the event loop, as the first (SQLite-only) store was: on a
local file each call is well under a millisecond, cheaper than a thread hop. On PostgreSQL a
call is a round trip to the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, literal, select, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from kiln.errors import ConfigError, InvalidRequestError, NotFoundError
from kiln.store import search as full_text
from kiln.store.database import database_url, describe, open_engine, writer
from kiln.store.liveness import Liveness, new_instance
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
from kiln.store.schema import conversations as conversations_table
from kiln.store.schema import messages as messages_table

DEFAULT_TITLE = "New chat"
_UNSET: Any = object()


class ChatStore:
    """The conversation repository (its database created, and migrated, on open).

    ``target`` is a SQLite file's path, ``:memory:``, or a database URL
    (``postgresql://...``; see :mod:`kiln.store.database`).

    Messages form a tree per conversation: a user message follows an assistant message (or
    starts the conversation), an assistant message answers a user message; messages with the
    same parent are siblings (regenerations, edits), in the order they were made.
    """

    def __init__(self, target: str | os.PathLike[str] | URL = ":memory:") -> None:
        self.url = target if isinstance(target, URL) else database_url(target)
        self.backend = self.url.get_backend_name()
        memory = self.backend == "sqlite" and not self.url.database
        self.path = None if self.backend != "sqlite" or memory else Path(self.url.database)
        """The SQLite file (None for PostgreSQL or in memory)."""
        self.engine = open_engine(self.url)
        self._writer = writer(self.engine)
        # NOTE: in memory there is one connection for every thread: calls take turns.
        self._lock: Any = threading.RLock() if memory else contextlib.nullcontext()
        self._last_time = 0.0
        self.instance = new_instance()
        """This store's id: the ``writer`` of the answers it generates."""
        self._liveness: Liveness | None = None
        try:
            migrate(self.engine)
            self._liveness = Liveness(self.engine, self.instance)
            self.num_interrupted = self._mark_interrupted()
            """Answers found mid-generation at open, whose server is gone."""
        except OperationalError as e:
            self.close()
            raise ConfigError(
                f"cannot open the chat database {describe(self.url)}: {e.orig}"
            ) from e
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._liveness is not None:
            self._liveness.close()
        self.engine.dispose()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """One consistent snapshot for the reads inside."""
        with self._lock, self.engine.connect() as connection:
            yield connection

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One transaction: committed whole at the end, rolled back whole on any error."""
        with self._lock, self._writer.begin() as connection:
            yield connection

    def _now(self) -> float:
        """Wall-clock time, strictly increasing within this store: two conversations made in
        one clock tick still list in the order they were made."""
        now = max(time.time(), self._last_time + 1e-6)
        self._last_time = now
        return now

    def _mark_interrupted(self) -> int:
        """Mark ``interrupted`` the answers left ``streaming`` by servers that are gone."""
        m = messages_table.c
        streaming = m.status == MessageStatus.STREAMING.value
        with self._read() as db:
            writers = db.execute(select(m.writer).where(streaming).distinct()).scalars().all()
        assert self._liveness is not None
        gone = [w for w in writers if self._liveness.is_gone(w)]
        if not gone:
            return 0
        claimed = [w for w in gone if w is not None]
        whose = m.writer.in_(claimed) if claimed else None
        if None in gone:
            whose = m.writer.is_(None) if whose is None else whose | m.writer.is_(None)
        with self._write() as db:
            result = db.execute(
                update(messages_table)
                .where(streaming, whose)
                .values(status=MessageStatus.INTERRUPTED.value)
            )
            return result.rowcount

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
        now = self._now()
        conversation_id = uuid.uuid4().hex
        with self._write() as db:
            db.execute(
                insert(conversations_table).values(
                    id=conversation_id,
                    owner=owner,
                    title=title,
                    system_prompt=system_prompt,
                    settings=json.dumps(settings.to_dict()),
                    created_at=now,
                    updated_at=now,
                )
            )
        return self.conversation(owner, conversation_id)

    def conversations(self, owner: str, limit: int = 1000) -> list[Conversation]:
        """The owner's conversations, the most recently active first."""
        c = conversations_table.c
        with self._read() as db:
            rows = db.execute(
                select(conversations_table)
                .where(c.owner == owner)
                .order_by(c.updated_at.desc(), c.created_at.desc(), c.id)
                .limit(limit)
            ).all()
        return [_conversation(row) for row in rows]

    def conversation(self, owner: str, conversation_id: str) -> Conversation:
        c = conversations_table.c
        with self._read() as db:
            row = db.execute(
                select(conversations_table).where(c.id == conversation_id, c.owner == owner)
            ).first()
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
        with self._write() as db:
            _owned(db, owner, conversation_id, for_update=True)
            if current_leaf_id is not _UNSET:
                _message_row(db, conversation_id, current_leaf_id)
                changes["current_leaf_id"] = current_leaf_id
            if changes:
                db.execute(
                    update(conversations_table)
                    .where(conversations_table.c.id == conversation_id)
                    .values(**changes)
                )
        return self.conversation(owner, conversation_id)

    def delete_conversation(self, owner: str, conversation_id: str) -> None:
        with self._write() as db:
            _owned(db, owner, conversation_id, for_update=True)
            # Its messages go with it (ON DELETE CASCADE), and their search index entries.
            db.execute(
                delete(conversations_table).where(conversations_table.c.id == conversation_id)
            )

    # --- messages -------------------------------------------------------------------------

    def messages(self, owner: str, conversation_id: str) -> list[Message]:
        """Every message of the conversation (all branches), oldest first."""
        m = messages_table.c
        with self._read() as db:
            _owned(db, owner, conversation_id)
            rows = db.execute(
                select(messages_table).where(m.conversation_id == conversation_id).order_by(m.seq)
            ).all()
        return [_message(row) for row in rows]

    def message(self, owner: str, conversation_id: str, message_id: str) -> Message:
        with self._read() as db:
            _owned(db, owner, conversation_id)
            return _message(_message_row(db, conversation_id, message_id))

    def branch(self, owner: str, conversation_id: str, leaf_id: str | None) -> list[Message]:
        """The messages from the first one down to ``leaf_id`` (empty for None)."""
        with self._read() as db:
            _owned(db, owner, conversation_id)
            if leaf_id is None:
                return []
            _message_row(db, conversation_id, leaf_id)
            m = messages_table.c
            up = (
                select(m.id, m.parent_id, literal(0).label("depth"))
                .where(m.conversation_id == conversation_id, m.id == leaf_id)
                .cte("up", recursive=True)
            )
            parent = messages_table.alias("parent")
            up = up.union_all(
                select(parent.c.id, parent.c.parent_id, up.c.depth + 1).where(
                    parent.c.id == up.c.parent_id, parent.c.conversation_id == conversation_id
                )
            )
            rows = db.execute(
                select(messages_table)
                .join(up, m.id == up.c.id)
                .where(m.conversation_id == conversation_id)
                .order_by(up.c.depth.desc())
            ).all()
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
        with self._write() as db:
            _owned(db, owner, conversation_id, for_update=True)
            parent = None if parent_id is None else _message_row(db, conversation_id, parent_id)
            _check_parent(role, None if parent is None else Role(parent.role))
            now = self._now()
            db.execute(
                insert(messages_table).values(
                    id=message_id,
                    conversation_id=conversation_id,
                    parent_id=parent_id,
                    role=role.value,
                    content=content,
                    status=MessageStatus(status).value,
                    model=model,
                    truncated=bool(truncated),
                    created_at=now,
                    writer=self.instance if status == MessageStatus.STREAMING else None,
                )
            )
            db.execute(
                update(conversations_table)
                .where(conversations_table.c.id == conversation_id)
                .values(current_leaf_id=message_id, updated_at=now)
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
        values: dict[str, Any] = {
            "content": content,
            "status": MessageStatus(status).value,
            "error": error,
        }
        if truncated is not None:
            values["truncated"] = bool(truncated)
        with self._write() as db:
            # NOTE: no row to update when the conversation was deleted mid-answer: fine.
            db.execute(
                update(messages_table).where(messages_table.c.id == message_id).values(**values)
            )

    def import_conversations(
        self, owner: str, conversations: Sequence[tuple[Conversation, Sequence[Message]]]
    ) -> list[Conversation]:
        """Store copies of ``conversations``, each with its messages (parents before
        children, as :meth:`messages` lists them), as new conversations of ``owner``: all of
        them or, on any error, none.

        Everything is kept but the ids, which are new (the tree's links follow them), and the
        owner; an answer that was being generated is stored as ``interrupted``.
        """
        _check_owner(owner)
        prepared = [_imported(conversation, messages) for conversation, messages in conversations]
        with self._write() as db:
            for conversation_row, message_rows in prepared:
                db.execute(insert(conversations_table).values(owner=owner, **conversation_row))
                # NOTE: one row at a time, in order: a message's seq (the order messages are
                # listed in) must follow its parent's.
                for row in message_rows:
                    db.execute(insert(messages_table).values(**row))
        return [self.conversation(owner, row["id"]) for row, _ in prepared]

    # --- search ---------------------------------------------------------------------------

    def search(self, owner: str, query: str, limit: int = 50) -> list[SearchHit]:
        """Messages of the owner's conversations that contain every word of ``query``,
        best match first."""
        with self._read() as db:
            return full_text.search(db, owner, query, limit)


# --- helpers ----------------------------------------------------------------------------------


def _owned(db: Connection, owner: str, conversation_id: str, for_update: bool = False) -> None:
    """NotFoundError unless the owner has this conversation. ``for_update`` locks its row to
    the end of the transaction (PostgreSQL; SQLite's writer already holds the whole file), so
    that it cannot be deleted under a write that checked it."""
    c = conversations_table.c
    query = select(c.id).where(c.id == conversation_id, c.owner == owner)
    if for_update:
        query = query.with_for_update()
    if db.execute(query).first() is None:
        raise NotFoundError(f"no conversation {conversation_id!r}")


def _message_row(db: Connection, conversation_id: str, message_id: str) -> Row[Any]:
    m = messages_table.c
    row = db.execute(
        select(messages_table).where(m.conversation_id == conversation_id, m.id == message_id)
    ).first()
    if row is None:
        raise NotFoundError(f"no message {message_id!r} in this conversation")
    return row


def _imported(
    conversation: Conversation, messages: Sequence[Message]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The rows that store a copy of ``conversation``, checked as a new one would be."""
    title = _clean_title(conversation.title)
    check_text(conversation.system_prompt, "system_prompt", MAX_SYSTEM_PROMPT_CHARS)
    conversation_id = uuid.uuid4().hex
    new_ids: dict[str, str] = {}
    roles: dict[str, Role] = {}
    rows = []
    for message in messages:
        if message.id in new_ids:
            raise InvalidRequestError(f"message {message.id!r} appears twice")
        if message.parent_id is not None and message.parent_id not in new_ids:
            raise InvalidRequestError(
                f"message {message.id!r} follows {message.parent_id!r}, "
                "which is not listed before it"
            )
        role = Role(message.role)
        check_text(
            message.content, "content", MAX_CONTENT_CHARS, allow_empty=role is Role.ASSISTANT
        )
        _check_parent(role, None if message.parent_id is None else roles[message.parent_id])
        status = MessageStatus(message.status)
        if status is MessageStatus.STREAMING:
            status = MessageStatus.INTERRUPTED  # nothing here is generating it
        new_ids[message.id] = uuid.uuid4().hex
        roles[message.id] = role
        rows.append(
            {
                "id": new_ids[message.id],
                "conversation_id": conversation_id,
                "parent_id": None if message.parent_id is None else new_ids[message.parent_id],
                "role": role.value,
                "content": message.content,
                "status": status.value,
                "model": message.model,
                "error": message.error,
                "truncated": bool(message.truncated),
                "created_at": float(message.created_at),
            }
        )
    leaf = conversation.current_leaf_id
    if leaf is not None and leaf not in new_ids:
        raise InvalidRequestError(f"current_leaf_id {leaf!r} is none of the messages")
    conversation_row = {
        "id": conversation_id,
        "title": title,
        "system_prompt": conversation.system_prompt,
        "settings": json.dumps(conversation.settings.to_dict()),
        "current_leaf_id": None if leaf is None else new_ids[leaf],
        "created_at": float(conversation.created_at),
        "updated_at": float(conversation.updated_at),
    }
    return conversation_row, rows


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner:
        raise InvalidRequestError("an owner id is required")


def _clean_title(title: str) -> str:
    check_text(title, "title", MAX_TITLE_CHARS)
    title = " ".join(title.split())  # one line: titles are shown in a list
    return title or DEFAULT_TITLE


def _check_parent(role: Role, parent: Role | None) -> None:
    if role is Role.ASSISTANT:
        if parent is not Role.USER:
            raise InvalidRequestError("an assistant message must answer a user message")
    elif parent is not None and parent is not Role.ASSISTANT:
        raise InvalidRequestError(
            "a user message must start the conversation or follow an assistant message"
        )


def _conversation(row: Row[Any]) -> Conversation:
    return Conversation(
        id=row.id,
        owner=row.owner,
        title=row.title,
        created_at=row.created_at,
        updated_at=row.updated_at,
        system_prompt=row.system_prompt,
        settings=GenerationSettings.from_dict(json.loads(row.settings)),
        current_leaf_id=row.current_leaf_id,
    )


def _message(row: Row[Any]) -> Message:
    return Message(
        id=row.id,
        conversation_id=row.conversation_id,
        parent_id=row.parent_id,
        role=Role(row.role),
        content=row.content,
        status=MessageStatus(row.status),
        created_at=row.created_at,
        model=row.model,
        error=row.error,
        truncated=bool(row.truncated),
    )
