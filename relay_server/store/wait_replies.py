"""Answers handed between replicas for callers held in wait mode (PostgreSQL only).

The replica whose agent sent the Reply is not always the one holding the caller. It then
leaves the answer here, sealed (associated data "reply:<event id>"), and `pg_notify`s
REPLY_CHANNEL with the event id in the same transaction; the caller's replica takes the
row (a delete, so one taker) when it hears the notification or, if it was lost, at its
next look. Rows whose caller is gone expire with the caller's deadline (retention).
"""

from __future__ import annotations

from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import crypto
from relay_server.store import tables

REPLY_CHANNEL = "stowhook_replies"
W = tables.wait_replies


def aad(event_id: str) -> bytes:
    return f"reply:{event_id}".encode()


async def put(
    conn: AsyncConnection, keyring: crypto.KeyRing, event_id: str, plain: bytes, expires_at: int
) -> None:
    """Leave the answer for the caller's replica (the first answer for an event wins)."""
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    row = {
        "event_id": event_id,
        "answer_sealed": keyring.seal(plain, aad(event_id)),
        "expires_at": expires_at,
    }
    await conn.execute(insert(W).values(**row).on_conflict_do_nothing())
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.select(sa.func.pg_notify(REPLY_CHANNEL, event_id)))


async def present(conn: AsyncConnection, event_ids: Collection[str]) -> list[str]:
    """Which of `event_ids` have an answer waiting (a read)."""
    if not event_ids:
        return []
    rows = await conn.scalars(sa.select(W.c.event_id).where(W.c.event_id.in_(list(event_ids))))
    return list(rows)


async def take(
    conn: AsyncConnection, keyring: crypto.KeyRing, event_ids: Collection[str]
) -> dict[str, bytes]:
    """Remove and open the answers left for `event_ids`."""
    if not event_ids:
        return {}
    rows = (
        await conn.execute(
            W.delete()
            .where(W.c.event_id.in_(list(event_ids)))
            .returning(W.c.event_id, W.c.answer_sealed)
        )
    ).all()
    return {event_id: keyring.open(sealed, aad(event_id)) for event_id, sealed in rows}
