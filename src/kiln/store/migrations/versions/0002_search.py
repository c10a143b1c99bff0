"""Full-text search over message contents, filled from the messages already stored.

SQLite: an FTS5 index kept by triggers (exactly the first hand-written store's schema 2).
PostgreSQL: a GIN index on the ``simple`` text-search configuration (lower-cased words, no
stemming: any language), over the first 100,000 characters of a message (a tsvector holds at
most 1 MB; past that an insert would fail). ``kiln.store.search`` queries the same expression,
or the index would not be used.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SQLITE = (
    """
    CREATE VIRTUAL TABLE messages_fts USING fts5 (
        content, content = 'messages', content_rowid = 'seq', tokenize = 'unicode61'
    )
    """,
    "INSERT INTO messages_fts (rowid, content) SELECT seq, content FROM messages",
    """
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END
    """,
    """
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.seq, old.content);
    END
    """,
    """
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.seq, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END
    """,
)

POSTGRESQL = (
    "CREATE INDEX messages_fts ON messages "
    "USING gin (to_tsvector('simple'::regconfig, left(content, 100000)))"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE:
            op.execute(statement)
    else:
        op.execute(POSTGRESQL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER messages_fts_{trigger}")
        op.execute("DROP TABLE messages_fts")
    else:
        op.execute("DROP INDEX messages_fts")
