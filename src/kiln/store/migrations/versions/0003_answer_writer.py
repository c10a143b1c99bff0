"""Which server is writing an answer (``messages.writer``), so that a server starting on a
store that others share marks as interrupted only the answers of servers that are gone.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for every answer written before: no server claims them.
    op.add_column("messages", sa.Column("writer", sa.Text))


def downgrade() -> None:
    op.drop_column("messages", "writer")
