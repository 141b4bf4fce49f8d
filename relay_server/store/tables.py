"""Schema (SQLAlchemy Core). Times are integer milliseconds since the epoch (UTC).

Changing this file needs a migration in relay_server/migrations/versions/.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = sa.String(36)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

buckets = sa.Table(
    "buckets",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("account_id", ID, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("max_age_ms", sa.BigInteger, nullable=False),
    sa.Column("retention_ms", sa.BigInteger, nullable=False),
    sa.Column("dlq_retention_ms", sa.BigInteger, nullable=False),
    sa.Column("dedup_headers", sa.Text, nullable=False),  # JSON list of header names
    sa.Column("dedup_window_ms", sa.BigInteger, nullable=False),
    sa.Column("ephemeral", sa.Boolean, nullable=False),
    sa.Column("input_auth", sa.Text, nullable=True),  # JSON: kind, username, bcrypt hash
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("account_id", "name", name="uq_buckets_account_name"),
)

inputs = sa.Table(
    "inputs",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("bucket_id", ID, sa.ForeignKey("buckets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("max_body_bytes", sa.Integer, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("verify", sa.Text, nullable=True),  # JSON: kind, header, encoding, ... no secrets
    # AES-256-GCM sealed JSON list of signing secrets; associated data "input:<id>:verify".
    sa.Column("verify_secrets_sealed", sa.LargeBinary, nullable=True),
    sa.Column("response", sa.Text, nullable=True),  # JSON ResponseMode; NULL: accept
    sa.Column("rate_per_s", sa.Float, nullable=True),
    sa.Column("rate_burst", sa.Integer, nullable=True),
    sa.Index("ix_inputs_bucket", "bucket_id"),
)

outputs = sa.Table(
    "outputs",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("bucket_id", ID, sa.ForeignKey("buckets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("ordered", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("bucket_id", "name", name="uq_outputs_bucket_name"),
)

agent_tokens = sa.Table(
    "agent_tokens",
    metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("account_id", ID, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("secret_hash", sa.String(100), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Column("last_used_at", sa.BigInteger, nullable=True),
    # Rotation: the previous secret stays valid until previous_valid_until.
    sa.Column("previous_secret_hash", sa.String(100), nullable=True),
    sa.Column("previous_valid_until", sa.BigInteger, nullable=True),
    # mTLS: SHA-256 of the client certificate (DER) this token is bound to; NULL: any.
    sa.Column("client_cert_sha256", sa.String(64), nullable=True),
)

token_buckets = sa.Table(
    "token_buckets",
    metadata,
    sa.Column(
        "key_id",
        sa.String(64),
        sa.ForeignKey("agent_tokens.key_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("bucket_id", ID, sa.ForeignKey("buckets.id", ondelete="CASCADE"), primary_key=True),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("bucket_id", ID, sa.ForeignKey("buckets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("input_id", ID, nullable=False),
    sa.Column("received_at", sa.BigInteger, nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    # AES-256-GCM sealed (relay_server.crypto); associated data = "<event id>:<field>".
    sa.Column("query_sealed", sa.LargeBinary, nullable=False),
    sa.Column("headers_sealed", sa.LargeBinary, nullable=False),
    sa.Column("body_sealed", sa.LargeBinary, nullable=False),
    # Ephemeral bucket: the sealed fields above hold nothing (sealed empty values); path
    # and source are empty too. The payload lives only in the receiving server's memory.
    sa.Column("ephemeral", sa.Boolean, nullable=False, server_default=sa.false()),
    # Wait mode: until when the caller that sent it is held for the destination's answer
    # (ms); NULL when nobody waits. An agent on any replica is then asked for a Reply.
    sa.Column("caller_waits_until", sa.BigInteger, nullable=True),
    # SQLite, bodies of 1 MiB or more: body_sealed holds a sealed empty body, and the body,
    # sealed the same way, is the file <database>.bodies/<id> (store/bodyfiles.py).
    sa.Column("body_file", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_events_bucket_received", "bucket_id", "received_at"),
    sa.Index("ix_events_input", "input_id"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("event_id", ID, sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    sa.Column("output_id", ID, sa.ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("available_at", sa.BigInteger, nullable=False),
    sa.Column("leased_at", sa.BigInteger, nullable=True),
    sa.Column("lease_expires_at", sa.BigInteger, nullable=True),
    sa.Column("leased_by", sa.String(200), nullable=True),
    sa.Column("first_attempt_at", sa.BigInteger, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("replay", sa.Boolean, nullable=False),
    sa.Column("replaced_by", ID, nullable=True),  # a DLQ replay made a fresh delivery
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    # Claims: oldest available first, per output.
    sa.Index("ix_deliveries_claim", "output_id", "state", "available_at"),
    # Reaper: leases past their deadline.
    sa.Index("ix_deliveries_lease", "state", "lease_expires_at"),
    sa.Index("ix_deliveries_event", "event_id"),
    # Ordered outputs: the oldest unsettled delivery is the head of the line.
    sa.Index("ix_deliveries_order", "output_id", "state", "id"),
)

# One row per provider event id seen in a bucket within its dedup window. The primary key
# makes the check atomic: two concurrent duplicates cannot both insert.
# Signed webhooks already accepted (e.g. a webhook-id with its timestamp): a second copy
# within the signature tolerance is a replay and is refused.
seen_nonces = sa.Table(
    "seen_nonces",
    metadata,
    sa.Column("input_id", ID, sa.ForeignKey("inputs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("nonce", sa.String(64), primary_key=True),  # SHA-256 of what was signed
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_seen_nonces_expires", "expires_at"),
)

dedup_keys = sa.Table(
    "dedup_keys",
    metadata,
    sa.Column("bucket_id", ID, sa.ForeignKey("buckets.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),  # SHA-256 of header name and value
    sa.Column("event_id", ID, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_dedup_keys_expires", "expires_at"),
)

# Wait mode across replicas: a destination's answer relayed by one replica for a caller
# held by another (AES-256-GCM sealed, associated data "reply:<event id>").
wait_replies = sa.Table(
    "wait_replies",
    metadata,
    sa.Column("event_id", ID, primary_key=True),
    sa.Column("answer_sealed", sa.LargeBinary, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_wait_replies_expires_at", "expires_at"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "delivery_id", ID, sa.ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("agent", sa.String(200), nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=True),
    sa.Column("ended_at", sa.BigInteger, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_attempts_delivery", "delivery_id"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("resource", sa.String(200), nullable=False),
    sa.Column("result", sa.String(20), nullable=False),
    sa.Column("source", sa.String(100), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index("ix_audit_at", "at"),
    sa.Index("ix_audit_action", "action", "at"),
)
