"""The store's tables as SQLAlchemy Core sees them at the newest schema revision.

The queries are built from these. The schema itself is made (and changed) by the Alembic
revisions in ``migrations/versions``, never from here: a revision is frozen once shipped,
while this module follows the head.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("title", Text, nullable=False),
    Column("system_prompt", Text, nullable=False, server_default=""),
    Column("settings", Text, nullable=False, server_default="{}"),
    Column("current_leaf_id", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

messages = Table(
    "messages",
    metadata,
    # NOTE: INTEGER on SQLite, where only that spelling makes the column the rowid (the full
    # text index refers to rows by it).
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("id", Text, nullable=False, unique=True),
    Column(
        "conversation_id",
        Text,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("parent_id", Text),
    Column("role", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("model", Text),
    Column("error", Text),
    Column("truncated", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    # The store instance (server) generating it while ``streaming``; see liveness.py.
    Column("writer", Text),
    UniqueConstraint("conversation_id", "id"),
    ForeignKeyConstraint(
        ["conversation_id", "parent_id"],
        ["messages.conversation_id", "messages.id"],
        ondelete="CASCADE",
    ),
    sqlite_autoincrement=True,
)
