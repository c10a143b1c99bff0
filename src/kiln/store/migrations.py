"""Versioned schema migrations of the SQLite conversation store.

The schema's version is SQLite's ``PRAGMA user_version``: migration ``n`` (1-based) takes a
database from version ``n - 1`` to ``n``. Each runs in one transaction together with the
version bump, so a crash mid-migration leaves the previous version whole. Append new
migrations; never edit one that has shipped (databases out there already ran it).
"""

from __future__ import annotations

import sqlite3

from kiln.errors import ConfigError

MIGRATIONS: tuple[str, ...] = (
    # 1: conversations and their messages as a tree.
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        system_prompt TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}',
        current_leaf_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC);
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        parent_id TEXT,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('complete', 'streaming', 'stopped', 'error', 'interrupted')),
        model TEXT,
        error TEXT,
        truncated INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        UNIQUE (conversation_id, id),
        -- NOTE: a composite key, so a parent is always in the same conversation.
        FOREIGN KEY (conversation_id, parent_id)
            REFERENCES messages (conversation_id, id) ON DELETE CASCADE
    );
    CREATE INDEX messages_by_parent ON messages (conversation_id, parent_id);
    CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';
    """,
    # 2: full-text search over message contents, filled from the messages already stored.
    """
    CREATE VIRTUAL TABLE messages_fts USING fts5 (
        content, content = 'messages', content_rowid = 'seq', tokenize = 'unicode61'
    );
    INSERT INTO messages_fts (rowid, content) SELECT seq, content FROM messages;
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END;
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.seq, old.content);
    END;
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.seq, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
    END;
    """,
)

LATEST_VERSION = len(MIGRATIONS)


def schema_version(connection: sqlite3.Connection) -> int:
    return connection.execute("PRAGMA user_version").fetchone()[0]


def migrate(connection: sqlite3.Connection, target: int = LATEST_VERSION) -> int:
    """Bring the database up to schema ``target``; returns the version it was at.

    ``connection`` must be in autocommit mode (``isolation_level=None``): each migration
    opens its own transaction.
    """
    found = schema_version(connection)
    if found > LATEST_VERSION:
        raise ConfigError(
            f"the chat database has schema version {found}, newer than this kiln knows "
            f"({LATEST_VERSION}): upgrade kiln or use another --chat-db"
        )
    for version in range(found + 1, target + 1):
        # NOTE: BEGIN IMMEDIATE takes the write lock up front, so two servers starting on
        # the same file run each migration once: the second sees the new version and skips.
        connection.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(connection) >= version:
                connection.execute("COMMIT")
                continue
            for statement in _statements(MIGRATIONS[version - 1]):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {version:d}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    return found


def _statements(script: str) -> list[str]:
    """``script`` split into whole statements (``executescript`` would commit on its own,
    outside the migration's transaction)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise AssertionError(f"an incomplete statement in a migration: {current!r}")
    return statements
