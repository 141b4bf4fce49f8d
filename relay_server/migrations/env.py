"""Alembic environment: migrations run on the connection the server hands over."""

from __future__ import annotations

from alembic import context

from relay_server.store import tables

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `relay-server migrate`")
context.configure(connection=connection, target_metadata=tables.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
