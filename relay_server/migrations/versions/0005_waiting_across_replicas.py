"""wait mode across replicas: events.caller_waits_until, wait_replies

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 09:00:00

A caller held in wait mode by one replica may get its answer from an agent connected to
another: the event says until when its caller waits, and the replica that receives the
agent's Reply leaves the answer, sealed, in wait_replies for the caller's replica.

Plain ALTERs only (see env.py: no batch mode on SQLite).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("caller_waits_until", sa.BigInteger(), nullable=True))
    op.create_table(
        "wait_replies",
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("answer_sealed", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_wait_replies"),
    )
    op.create_index("ix_wait_replies_expires_at", "wait_replies", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_wait_replies_expires_at", table_name="wait_replies")
    op.drop_table("wait_replies")
    op.drop_column("events", "caller_waits_until")
