"""dedup keys, DLQ retention, ordered outputs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 16:40:00

Existing buckets get the defaults: dedup on X-Provider-Event-Id for 24 h, DLQ retention
7 days; existing outputs stay unordered. The server defaults stay on the columns (new rows
always name their values).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DAY_MS = 86_400_000


def upgrade() -> None:
    # Plain ADD COLUMN, never batch mode: on SQLite a batch copies the table and drops the
    # old one, and with foreign keys on that DROP cascades to every input, output and event.
    op.add_column(
        "buckets",
        sa.Column(
            "dlq_retention_ms", sa.BigInteger(), nullable=False, server_default=str(7 * DAY_MS)
        ),
    )
    op.add_column(
        "buckets",
        sa.Column(
            "dedup_headers", sa.Text(), nullable=False, server_default='["X-Provider-Event-Id"]'
        ),
    )
    op.add_column(
        "buckets",
        sa.Column("dedup_window_ms", sa.BigInteger(), nullable=False, server_default=str(DAY_MS)),
    )
    op.add_column(
        "outputs", sa.Column("ordered", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.create_index("ix_deliveries_order", "deliveries", ["output_id", "state", "id"])
    op.create_table(
        "dedup_keys",
        sa.Column("bucket_id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["bucket_id"],
            ["buckets.id"],
            name=op.f("fk_dedup_keys_bucket_id_buckets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("bucket_id", "key", name=op.f("pk_dedup_keys")),
    )
    op.create_index("ix_dedup_keys_expires", "dedup_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_dedup_keys_expires", table_name="dedup_keys")
    op.drop_table("dedup_keys")
    op.drop_index("ix_deliveries_order", table_name="deliveries")
    op.drop_column("outputs", "ordered")  # SQLite >= 3.35 drops a column in place
    op.drop_column("buckets", "dedup_window_ms")
    op.drop_column("buckets", "dedup_headers")
    op.drop_column("buckets", "dlq_retention_ms")
