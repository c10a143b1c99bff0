"""Alembic's entry point for the store's revisions: always run by
:func:`kiln.store.migrations.migrate`, on the connection (and in the transaction) it gives."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "kiln's chat store runs its own migrations when it opens (kiln.store.migrations.migrate)"
    )
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
