"""events.body_file: on SQLite a large body is a sealed file beside the database

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 23:30:00

A body of 1 MiB or more is no longer written into the events row on SQLite: the row keeps
a sealed empty body and body_file is true, and the sealed body is the file
<database>.bodies/<event id> (relay_server/store/bodyfiles.py). A column with a constant
default: SQLite and PostgreSQL (11 and later) add it without rewriting the table. Rows
stored before keep their bodies inline (body_file false), and stay readable.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "events",
        sa.Column("body_file", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    # Bodies in files would be lost with the column: refuse rather than drop them.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM events WHERE body_file LIMIT 1")).first():
        raise RuntimeError(
            "events hold bodies in files (<database>.bodies): move them to PostgreSQL with "
            "relay-server migrate-data, or delete those events, before downgrading"
        )
    with op.batch_alter_table("events") as batch:
        batch.drop_column("body_file")
