"""Where the conversation store lives, as a SQLAlchemy engine: a SQLite file (WAL) or a
PostgreSQL server, named by one string (``--db``).

- a path (``chat.sqlite3``, ``~/chats/kiln.db``) or ``sqlite:///PATH``: a SQLite file,
  created with its folder when missing; ``:memory:`` keeps everything in memory.
- ``postgresql://user:pass@host/db`` (or ``postgres://``, ``postgresql+psycopg://``): a
  PostgreSQL server, through psycopg 3.

Writes on SQLite take the write lock when they begin (``BEGIN IMMEDIATE``): a transaction
that reads and then writes would otherwise fail with "database is locked" when another
connection wrote in between, whatever the busy timeout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from kiln.errors import ConfigError

WRITE = "kiln_write"
"""The execution option that marks a connection as a writer (see :func:`writer`)."""

_BUSY_TIMEOUT_MS = 5000


def database_url(target: str | os.PathLike[str]) -> URL:
    """The SQLAlchemy URL ``target`` names (see the module's docstring)."""
    text = os.fspath(target)
    if text == ":memory:":
        return make_url("sqlite://")
    if "://" not in text:
        return make_url("sqlite:///" + str(Path(text).expanduser().absolute()))
    try:
        url = make_url(text)
    except Exception as e:  # ArgumentError: not a URL SQLAlchemy can read
        raise ConfigError(f"--db: not a path or a database URL: {e}") from e
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        # NOTE: psycopg 3 is the driver kiln depends on; a bare postgresql:// would pick
        # psycopg2, which is not installed.
        return url.set(drivername="postgresql+psycopg")
    if backend != "sqlite":
        raise ConfigError(f"--db: kiln stores chats in SQLite or PostgreSQL, not {backend!r}")
    return url


def describe(url: URL) -> str:
    """``url`` fit for a message or a log: its password hidden."""
    return url.render_as_string(hide_password=True)


def open_engine(target: str | os.PathLike[str] | URL) -> Engine:
    url = target if isinstance(target, URL) else database_url(target)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    # NOTE: pool_pre_ping: a server restarted (or a connection dropped by a proxy) between
    # requests costs a reconnect, not a failed request.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def writer(engine: Engine) -> Engine:
    """``engine`` whose transactions begin as writers (``BEGIN IMMEDIATE`` on SQLite)."""
    return engine.execution_options(**{WRITE: True})


def _sqlite_engine(url: URL) -> Engine:
    memory = url.database in (None, "", ":memory:")
    options: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if memory:
        # One connection for the store's life: each new one would be a new, empty database.
        options["poolclass"] = StaticPool
    else:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **options)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # NOTE: the driver's own transaction handling is off (it would not begin one before
        # DDL, so a migration would not be atomic): _begin below opens each transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS:d}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        write = connection.get_execution_options().get(WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
