"""events.ephemeral: the payload of this event lives only in the server's memory

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 09:00:00

Plain ALTERs only (see env.py: no batch mode on SQLite).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "events", sa.Column("ephemeral", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    op.drop_column("events", "ephemeral")
