"""Forgetting on schedule: expired dedup keys and replay nonces, old dead letters, settled
old events.

Each call deletes at most `limit` rows in one short write transaction, so the cleaner
interleaves with ingest instead of holding the writer. An event with a PENDING or LEASED
delivery is never deleted, however old: downtime is a delay, not a loss. An event with a
DEAD delivery stays until that delivery leaves the DLQ (the bucket's DLQ retention).

Every replica runs the cleaner: each batch first takes the "retention" advisory lock
(store/replicas.py) and is skipped when another replica holds it, so batches never race.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import models
from relay_server.store import replicas, tables

B, E, D, OUT, K, N = (
    tables.buckets,
    tables.events,
    tables.deliveries,
    tables.outputs,
    tables.dedup_keys,
    tables.seen_nonces,
)

KEEP_EVENT = (
    models.DeliveryState.PENDING,
    models.DeliveryState.LEASED,
    models.DeliveryState.DEAD,
)


async def expired_dedup_keys(conn: AsyncConnection, *, now: int, limit: int) -> int:
    return await _expired(conn, K, now, limit)


async def expired_nonces(conn: AsyncConnection, *, now: int, limit: int) -> int:
    """Replay nonces whose signature timestamps would be refused as stale by now."""
    return await _expired(conn, N, now, limit)


async def _expired(conn: AsyncConnection, table: sa.Table, now: int, limit: int) -> int:
    """Delete up to `limit` rows of `table` whose `expires_at` has passed."""
    if not await replicas.exclusive(conn, "retention"):
        return 0
    key = list(table.primary_key.columns)
    doomed = sa.select(*key).where(table.c.expires_at <= now).limit(limit)
    rows = (await conn.execute(doomed)).all()
    if rows:
        await conn.execute(table.delete().where(sa.tuple_(*key).in_([tuple(r) for r in rows])))
    return len(rows)


async def old_dead_letters(conn: AsyncConnection, *, now: int, limit: int) -> int:
    """DEAD deliveries past their bucket's DLQ retention (with their attempts)."""
    if not await replicas.exclusive(conn, "retention"):
        return 0
    doomed = (
        sa.select(D.c.id)
        .join(OUT, OUT.c.id == D.c.output_id)
        .join(B, B.c.id == OUT.c.bucket_id)
        .where(D.c.state == models.DeliveryState.DEAD, D.c.updated_at < now - B.c.dlq_retention_ms)
        .limit(limit)
    )
    found = list((await conn.execute(doomed)).scalars())
    if found:
        await conn.execute(D.delete().where(D.c.id.in_(found)))
    return len(found)


async def old_events(conn: AsyncConnection, bucket_id: str, cutoff: int, limit: int) -> int:
    """Events of one bucket received before `cutoff` with nothing left to deliver or inspect."""
    if not await replicas.exclusive(conn, "retention"):
        return 0
    unsettled = sa.exists().where(D.c.event_id == E.c.id, D.c.state.in_(KEEP_EVENT))
    doomed = (
        sa.select(E.c.id)
        .where(E.c.bucket_id == bucket_id, E.c.received_at < cutoff, ~unsettled)
        .order_by(E.c.received_at)
        .limit(limit)
    )
    found = list((await conn.execute(doomed)).scalars())
    if found:
        await conn.execute(E.delete().where(E.c.id.in_(found)))
    return len(found)


async def retention_cutoffs(conn: AsyncConnection, now: int) -> list[tuple[str, int]]:
    """(bucket id, received_at before which its events may go) for every bucket."""
    rows = await conn.execute(sa.select(B.c.id, B.c.retention_ms))
    return [(bucket_id, now - retention_ms) for bucket_id, retention_ms in rows]
