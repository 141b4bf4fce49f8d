"""Forgetting on schedule: expired dedup keys, replay nonces and relayed answers, old
dead letters, settled old events.

Each call deletes at most `limit` rows in one short write transaction, so the cleaner
interleaves with ingest instead of holding the writer. An event with a PENDING or LEASED
delivery is never deleted, however old: downtime is a delay, not a loss. An event with a
DEAD delivery stays until that delivery leaves the DLQ (the bucket's DLQ retention).

A pass costs what it deletes, not what it keeps. Old events are walked per bucket in
windows of `limit` rows along ix_events_bucket_received (dead letters per output along
ix_deliveries_order), and each window is a bounded index range: a window finds which of
its rows must stay with one lookup per row in ix_deliveries_event, never by scanning
everything older. The cleaner keeps its place in memory (`Sweep`) and a pass stops after
KEPT_WINDOWS_PER_PASS windows' worth of rows it had to keep, so an agent away for a week,
leaving millions of pending events at the front, costs each pass a fixed amount: the next
pass resumes where this one stopped, and a walk that reaches the end starts again from
the oldest. What a walk has passed (a pending event since delivered) goes when the walk
comes round again. On PostgreSQL the rows to delete are taken with FOR UPDATE SKIP LOCKED
and checked again under that lock, so the cleaner never waits for an agent, an ingest or a
replay, and never deletes an event that a replay just gave a fresh delivery. The running
cleaner paces itself (CLEANER_BUSY_SHARE, Sweep.rest) so that deleting a large backlog
does not take the database from ingest. On SQLite a pass ends by removing the body files
(store/bodyfiles.py) that no event names any more.

Every replica runs the cleaner: each batch first takes the "retention" advisory lock
(store/replicas.py) and is skipped when another replica holds it, so batches never race.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import models
from relay_server.store import bodyfiles, database, replicas, tables

B, E, D, OUT, K, N, W = (
    tables.buckets,
    tables.events,
    tables.deliveries,
    tables.outputs,
    tables.dedup_keys,
    tables.seen_nonces,
    tables.wait_replies,
)

KEEP_EVENT = (
    models.DeliveryState.PENDING,
    models.DeliveryState.LEASED,
    models.DeliveryState.DEAD,
)
# A walk passes at most this many windows' worth of rows it must keep per bucket (or
# output) and pass; rows it deletes do not count, so a backlog to delete goes in one pass.
KEPT_WINDOWS_PER_PASS = 20
# The running cleaner's batches take at most this share of its time (see Sweep.rest).
# Chosen with bench/retention.py (shared 2-CPU machine, ingest flooded over 64
# connections; ratio = ingest rate while the cleaner deletes / while it is idle, each
# window +-15 % or worse with the other load there). PostgreSQL: 0.5 gave 0.87, 0.25 gave
# 0.90-0.91 (1,800 events/s deleted), 0.1 gave 0.96 (670 events/s deleted, each with its
# delivery and attempt). SQLite, where a batch holds the one writer every ingest needs:
# 0.25 gave 0.75-0.92, 0.1 gave 0.95-0.99. With ingest lighter the batches are shorter
# and the cleaner goes faster.
CLEANER_BUSY_SHARE = 0.1

Position = TypeVar("Position", int, str)


@dataclass(slots=True)
class Sweep:
    """The cleaner's state from one pass to the next: where its walks stand, and its pace.

    events: bucket id -> received_at its next window starts at (inclusive);
    dead_letters: output id -> the dead delivery id its next window starts after.
    No entry: start from the oldest (a restarted cleaner walks again; nothing is lost).
    """

    events: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, str] = field(default_factory=dict)
    busy_share: float = 1.0  # 1.0: no pause between batches (a pass run by hand, tests)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # end the pass early

    async def rest(self, busy_s: float) -> None:
        """Pause after a batch that took `busy_s`, so batches take at most `busy_share` of
        the time. A batch takes longer when the database is busy (with ingest, say), so
        the cleaner gives way the more the busier it is. Returns at once when stopping."""
        pause = busy_s * (1 - self.busy_share) / self.busy_share
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)


@dataclass(frozen=True, slots=True)
class Window(Generic[Position]):
    """What one batch looked at and deleted, and where the walk goes on."""

    examined: int
    deleted: int
    resume: Position | None  # None: the walk reached its end


async def clean(db: database.Database, sweep: Sweep, *, now: int, limit: int) -> dict[str, int]:
    """One pass of every rule; how many rows of each kind went."""
    removed = {
        # dedup keys past the bucket's window; replay nonces whose signature timestamps
        # would be refused as stale by now; answers relayed for waiting callers that are
        # gone (timed out, or on a dead replica)
        name: await _expire(db, sweep, table, now=now, limit=limit)
        for name, table in (("dedup_keys", K), ("nonces", N), ("wait_replies", W))
    }
    removed["dead_letters"] = await clean_dead_letters(db, sweep, limit=limit)
    removed["events"] = await clean_events(db, sweep, limit=limit)
    # SQLite: files of large bodies no event names (none on PostgreSQL)
    removed["body_files"] = 0 if db.bodies is None else await clean_body_files(db, db.bodies)
    return removed


async def clean_body_files(
    db: database.Database,
    files: bodyfiles.BodyFiles,
    *,
    grace_s: float = bodyfiles.ORPHAN_GRACE_S,
    batch: int = 500,
) -> int:
    """Remove body files no events row names (their events deleted, or never committed),
    once older than `grace_s`; returns how many went."""
    names = await asyncio.to_thread(files.names)
    orphans: list[str] = []
    for start in range(0, len(names), batch):
        chunk = names[start : start + batch]
        async with db.read() as conn:
            named = set(
                (
                    await conn.execute(sa.select(E.c.id).where(E.c.id.in_(chunk), E.c.body_file))
                ).scalars()
            )
        orphans += [event_id for event_id in chunk if event_id not in named]
    if not orphans:
        return 0
    return await asyncio.to_thread(files.remove_orphans, orphans, grace_s=grace_s)


async def _expire(
    db: database.Database, sweep: Sweep, table: sa.Table, *, now: int, limit: int
) -> int:
    deleted = 0
    while not sweep.stopping.is_set():
        started = time.monotonic()
        n = await db.write(functools.partial(_expired, table=table, now=now, limit=limit))
        deleted += n
        if n < limit:
            break
        await sweep.rest(time.monotonic() - started)
    return deleted


async def _expired(conn: AsyncConnection, *, table: sa.Table, now: int, limit: int) -> int:
    """Delete up to `limit` rows of `table` whose `expires_at` has passed."""
    if not await replicas.exclusive(conn, "retention"):
        return 0
    key = list(table.primary_key.columns)
    doomed = sa.select(*key).where(table.c.expires_at <= now).limit(limit)
    rows = (await conn.execute(doomed)).all()
    if rows:
        await conn.execute(table.delete().where(sa.tuple_(*key).in_([tuple(r) for r in rows])))
    return len(rows)


async def clean_dead_letters(db: database.Database, sweep: Sweep, *, limit: int) -> int:
    """DEAD deliveries past their bucket's DLQ retention (with their attempts), every output."""
    return await _walk_each(db, sweep, OUT.c.id, old_dead_letters, sweep.dead_letters, limit)


async def clean_events(db: database.Database, sweep: Sweep, *, limit: int) -> int:
    """Events past their bucket's retention with nothing left to deliver or inspect."""
    return await _walk_each(db, sweep, B.c.id, old_events, sweep.events, limit)


async def _walk_each(
    db: database.Database,
    sweep: Sweep,
    owners: sa.Column[str],
    step: Callable[..., Awaitable[Window[Position] | None]],
    positions: dict[str, Position],
    limit: int,
) -> int:
    """`_walk` for every owner (each bucket, or each output) there is now; positions of
    owners deleted since are forgotten."""
    async with db.read() as conn:
        owner_ids = set(await conn.scalars(sa.select(owners)))
    for gone in positions.keys() - owner_ids:
        del positions[gone]
    deleted = 0
    for owner_id in owner_ids:
        deleted += await _walk(db, sweep, step, positions, owner_id, limit)
    return deleted


async def _walk(
    db: database.Database,
    sweep: Sweep,
    step: Callable[..., Awaitable[Window[Position] | None]],
    positions: dict[str, Position],
    key: str,
    limit: int,
) -> int:
    """Windows of `step` for `key` (a bucket or an output), each in its own short write
    transaction, from where the last pass stopped; returns how many rows went.

    Stops when the walk reaches its end (the next pass starts again from the oldest), when
    another replica holds the cleaner's lock, or once it has passed
    KEPT_WINDOWS_PER_PASS * limit rows it had to keep (the next pass resumes there). Each
    window reads the bucket's retention and the clock afresh, so a policy changed while a
    long pass runs counts from the next window on.
    """

    async def one(conn: AsyncConnection, start: Position | None) -> Window[Position] | None:
        return await step(conn, key, start=start, now=models.now_ms(), limit=limit)

    deleted = kept = 0
    while kept < KEPT_WINDOWS_PER_PASS * limit and not sweep.stopping.is_set():
        started = time.monotonic()
        window = await db.write(functools.partial(one, start=positions.get(key)))
        if window is None:
            break
        deleted += window.deleted
        kept += window.examined - window.deleted
        if window.resume is None:
            positions.pop(key, None)
            break
        positions[key] = window.resume
        await sweep.rest(time.monotonic() - started)
    return deleted


async def old_dead_letters(
    conn: AsyncConnection, output_id: str, *, start: str | None, now: int, limit: int
) -> Window[str] | None:
    """One window of an output's DEAD deliveries in id order after `start`: those that
    died longer than the bucket's DLQ retention ago go. None: another replica is cleaning."""
    if not await replicas.exclusive(conn, "retention"):
        return None
    dlq_retention = (
        sa.select(B.c.dlq_retention_ms)
        .join(OUT, OUT.c.bucket_id == B.c.id)
        .where(OUT.c.id == output_id)
        .scalar_subquery()
    )
    expired = D.c.updated_at < now - dlq_retention
    query = sa.select(D.c.id, expired.label("expired")).where(
        D.c.output_id == output_id, D.c.state == models.DeliveryState.DEAD
    )
    if start is not None:
        query = query.where(D.c.id > start)
    rows = (await conn.execute(query.order_by(D.c.id).limit(limit))).all()  # ix_deliveries_order
    doomed = await _free(conn, D, [row.id for row in rows if row.expired])
    deleted = 0
    if doomed:
        still = sa.and_(D.c.state == models.DeliveryState.DEAD, expired)
        deleted = await _delete(conn, D, doomed, still)
    resume = str(rows[-1].id) if len(rows) == limit else None
    return Window(examined=len(rows), deleted=deleted, resume=resume)


async def old_events(
    conn: AsyncConnection, bucket_id: str, *, start: int | None, now: int, limit: int
) -> Window[int] | None:
    """One window of a bucket's events older than its retention, oldest first from `start`:
    those with nothing left to deliver or inspect go. None: another replica is cleaning."""
    if not await replicas.exclusive(conn, "retention"):
        return None
    retention = sa.select(B.c.retention_ms).where(B.c.id == bucket_id).scalar_subquery()
    # Bounded on both sides even from the oldest (start 0): without statistics (autovacuum
    # off, a fresh table) PostgreSQL guesses a one-sided range matches a third of the
    # table and may sort a sequential scan instead of reading `limit` index entries.
    window = (
        sa.select(E.c.id, E.c.received_at)
        .where(
            E.c.bucket_id == bucket_id,
            E.c.received_at >= (start if start is not None else 0),
            E.c.received_at < now - retention,
        )
        .order_by(E.c.received_at)
        .limit(limit)
        .subquery()
    )
    rows = (
        await conn.execute(
            sa.select(
                window.c.id, window.c.received_at, _keeps(window.c.id).label("keeps")
            ).order_by(window.c.received_at)
        )
    ).all()
    doomed = await _free(conn, E, [str(row.id) for row in rows if not row.keeps])
    deleted = 0
    if doomed:  # asked again after the lock: a replay may have added a delivery meanwhile
        deleted = await _delete(conn, E, doomed, sa.func.coalesce(_keeps(E.c.id), 0) == 0)
    resume = _events_resume([row.received_at for row in rows], limit=limit, deleted=deleted)
    return Window(examined=len(rows), deleted=deleted, resume=resume)


def _keeps(event_id: sa.ColumnElement[str]) -> sa.ScalarSelect[int]:
    """1 if a delivery keeps the event (pending, leased or dead); 0, or NULL without any.

    It reads the event's own deliveries through ix_deliveries_event and looks at their
    states in the select list, once per row of the window. With the state in the WHERE
    (EXISTS, an IN list) PostgreSQL without fresh statistics takes "state IN (...)" for
    selective and reads all of a week's pending deliveries for every window: by a hash, or
    by ANDing ix_deliveries_lease into every lookup.
    """
    keeping = sa.case((D.c.state.in_(KEEP_EVENT), 1), else_=0)
    return sa.select(sa.func.max(keeping)).where(D.c.event_id == event_id).scalar_subquery()


def _events_resume(received: Sequence[int], *, limit: int, deleted: int) -> int | None:
    """Where the next window of events starts (received_at, inclusive); None when this one
    reached the cutoff.

    The index orders events by received_at only, so windows overlap on the last
    millisecond of this one, which may go on past it. A full window received all in one
    millisecond in which nothing went steps past that millisecond: its rest waits for a
    later walk, rather than `limit` kept events stopping every walk there.
    """
    if len(received) < limit:
        return None
    first, last = received[0], received[-1]
    return last + 1 if first == last and not deleted else last


async def _free(conn: AsyncConnection, table: sa.Table, ids: Sequence[str]) -> list[str]:
    """Those of `ids` no other transaction holds, locked until this one ends.

    PostgreSQL: FOR UPDATE SKIP LOCKED, so the cleaner never waits for an agent, an ingest
    or a replay; a row it skips is taken by a later walk. SQLite: all of them (one writer).
    """
    if not ids or conn.dialect.name != "postgresql":
        return list(ids)
    query = sa.select(table.c.id).where(table.c.id.in_(ids)).with_for_update(skip_locked=True)
    return [str(row_id) for row_id in await conn.scalars(query)]


async def _delete(
    conn: AsyncConnection, table: sa.Table, ids: Sequence[str], still: sa.ColumnElement[bool]
) -> int:
    """Delete the rows of `ids` for which `still` holds (cascading to their children)."""
    result = await conn.execute(table.delete().where(table.c.id.in_(ids), still))
    return int(result.rowcount)
