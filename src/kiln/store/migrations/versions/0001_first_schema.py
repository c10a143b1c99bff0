"""Conversations and their messages as a tree.

On SQLite this is exactly the first hand-written schema (``PRAGMA user_version`` 1), so files
made by it are stamped with this revision rather than rebuilt.

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ROLES = "role IN ('user', 'assistant')"
STATUSES = "status IN ('complete', 'streaming', 'stopped', 'error', 'interrupted')"


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("system_prompt", sa.Text, nullable=False, server_default=""),
        sa.Column("settings", sa.Text, nullable=False, server_default="{}"),
        sa.Column("current_leaf_id", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index(
        "conversations_by_owner", "conversations", ["owner", sa.text("updated_at DESC")]
    )
    op.create_table(
        "messages",
        # NOTE: INTEGER on SQLite: only that spelling makes it the rowid (and AUTOINCREMENT
        # never reuses one, so a deleted message's number is never another's).
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column(
            "conversation_id",
            sa.Text,
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("parent_id", sa.Text),
        sa.Column("role", sa.Text, sa.CheckConstraint(ROLES), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("status", sa.Text, sa.CheckConstraint(STATUSES), nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("truncated", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("conversation_id", "id"),
        # A composite key, so that a parent is always in the same conversation.
        sa.ForeignKeyConstraint(
            ["conversation_id", "parent_id"],
            ["messages.conversation_id", "messages.id"],
            ondelete="CASCADE",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("messages_by_parent", "messages", ["conversation_id", "parent_id"])
    streaming = sa.text("status = 'streaming'")
    op.create_index(
        "messages_streaming",
        "messages",
        ["status"],
        sqlite_where=streaming,
        postgresql_where=streaming,
    )


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("conversations")
