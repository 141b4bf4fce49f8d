"""Alembic environment: migrations run on the connection the server hands over."""

from __future__ import annotations

from alembic import context

from relay_server.store import tables

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `relay-server migrate`")
# No batch mode: on SQLite it rebuilds a table by DROP + copy, and with foreign keys on the
# DROP cascades to the rows that reference it. Write migrations as plain ALTERs.
context.configure(connection=connection, target_metadata=tables.metadata)
with context.begin_transaction():
    context.run_migrations()
