"""input auth, signature verification, response modes, rate limits, ephemeral buckets,
token rotation and mTLS binding, replay nonces

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 16:50:00

Plain ALTERs only (see env.py: no batch mode on SQLite).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "buckets", sa.Column("ephemeral", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("buckets", sa.Column("input_auth", sa.Text(), nullable=True))
    op.add_column("inputs", sa.Column("verify", sa.Text(), nullable=True))
    op.add_column("inputs", sa.Column("verify_secrets_sealed", sa.LargeBinary(), nullable=True))
    op.add_column("inputs", sa.Column("response", sa.Text(), nullable=True))
    op.add_column("inputs", sa.Column("rate_per_s", sa.Float(), nullable=True))
    op.add_column("inputs", sa.Column("rate_burst", sa.Integer(), nullable=True))
    op.add_column(
        "agent_tokens", sa.Column("previous_secret_hash", sa.String(length=100), nullable=True)
    )
    op.add_column("agent_tokens", sa.Column("previous_valid_until", sa.BigInteger(), nullable=True))
    op.add_column(
        "agent_tokens", sa.Column("client_cert_sha256", sa.String(length=64), nullable=True)
    )
    op.create_table(
        "seen_nonces",
        sa.Column("input_id", sa.String(length=36), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["input_id"],
            ["inputs.id"],
            name=op.f("fk_seen_nonces_input_id_inputs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("input_id", "nonce", name=op.f("pk_seen_nonces")),
    )
    op.create_index("ix_seen_nonces_expires", "seen_nonces", ["expires_at"])
    op.create_index("ix_audit_action", "audit_log", ["action", "at"])


def downgrade() -> None:
    op.drop_index("ix_audit_action", table_name="audit_log")
    op.drop_index("ix_seen_nonces_expires", table_name="seen_nonces")
    op.drop_table("seen_nonces")
    for column in ("client_cert_sha256", "previous_valid_until", "previous_secret_hash"):
        op.drop_column("agent_tokens", column)
    for column in ("rate_burst", "rate_per_s", "response", "verify_secrets_sealed", "verify"):
        op.drop_column("inputs", column)
    op.drop_column("buckets", "input_auth")
    op.drop_column("buckets", "ephemeral")
