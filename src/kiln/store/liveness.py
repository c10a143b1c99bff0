"""Which servers sharing a store are still running, so that a server starting on it marks as
interrupted the answers that a dead server left ``streaming``, and no answer another server is
writing now.

On PostgreSQL each store holds a session-level advisory lock named after its instance id for
as long as it is open, on a connection of its own: the server releases it when that
connection ends, which a crashed process's does. A writer whose lock can be taken is gone.

On SQLite there is no such signal between processes: every answer found ``streaming`` at
open counts as interrupted, which is right for the usual one server per file (a second server
started beside a running one would mark that one's current answers interrupted until their
next save).
"""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, Engine, text


def new_instance() -> str:
    return uuid.uuid4().hex


def _key(instance: str) -> int:
    # 60 bits of the id: a PostgreSQL bigint (signed 64-bit) holds it.
    return int(instance[:15], 16)


class Liveness:
    """This store's claim to be alive, and the test of another's."""

    def __init__(self, engine: Engine, instance: str) -> None:
        self.instance = instance
        self._connection: Connection | None = None
        if engine.dialect.name == "postgresql":
            # NOTE: autocommit: the lock belongs to the session, and a transaction left open
            # for the server's life would hold back vacuum.
            connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _key(instance)})
            self._connection = connection

    def is_gone(self, writer: str | None) -> bool:
        """Whether the server that was writing an answer (``writer``) is gone."""
        if writer is None or self._connection is None:
            return True  # no claim (an answer from before writers were kept), or SQLite
        if writer == self.instance:
            return False
        key = {"key": _key(writer)}
        taken = self._connection.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar()
        if taken:
            self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
        return bool(taken)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
