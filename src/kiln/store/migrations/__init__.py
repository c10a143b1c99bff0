"""Versioned schema migrations of the conversation store, run by Alembic at open.

The revisions are in ``versions/`` (shipped in the package); :func:`migrate` brings a database
to the newest one. Append new revisions; never edit one that has shipped (databases out there
already ran it). All pending revisions run in one transaction, on SQLite as on PostgreSQL
(both have transactional DDL), so a failed upgrade leaves the previous revision whole; two
servers opening one database at once run them once (the first holds a lock, the second then
finds nothing to do).

SQLite files made by kiln's first, hand-written store carry their schema version in ``PRAGMA
user_version`` (1: tables, 2: full-text search) and have no ``alembic_version`` table. Those
schemas are exactly revisions 0001 and 0002, so such a file is stamped with the matching
revision and upgraded from there: its conversations are kept.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, text

from kiln.errors import ConfigError
from kiln.store.database import describe, writer

HEAD = "head"
LEGACY_REVISIONS = {1: "0001", 2: "0002"}
"""``PRAGMA user_version`` of kiln's first SQLite store -> the revision with that schema."""

_PG_LOCK_KEY = 0x6B696C6E  # "kiln": one advisory lock key for the store's migrations


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return ScriptDirectory.from_config(config)


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None: no schema yet, or a first-store SQLite file
    not adopted yet)."""
    return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine, target: str = HEAD) -> str | None:
    """Bring the database to revision ``target``; returns the revision it was at."""
    with writer(engine).begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held to the end of the transaction: a second server waits, then finds it done.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        config = _config(connection)
        found = current_revision(connection)
        if found is None:
            found = _adopt_first_store(connection, config)
        if found is not None:
            try:
                scripts().get_revision(found)
            except CommandError as e:
                raise ConfigError(
                    f"the chat database {describe(engine.url)} is at schema revision {found!r}, "
                    "newer than this kiln knows: upgrade kiln or use another --db"
                ) from e
        command.upgrade(config, target)
    return found


def _adopt_first_store(connection: Connection, config: Config) -> str | None:
    """Stamp a SQLite file of kiln's first store with the revision its schema is."""
    if connection.dialect.name != "sqlite":
        return None
    version = connection.exec_driver_sql("PRAGMA user_version").scalar_one()
    if version == 0:
        return None
    revision = LEGACY_REVISIONS.get(version)
    if revision is None or not inspect(connection).has_table("messages"):
        raise ConfigError(
            f"the chat database has schema version {version}, which this kiln does not know: "
            "upgrade kiln or use another --db"
        )
    command.stamp(config, revision)
    return revision
