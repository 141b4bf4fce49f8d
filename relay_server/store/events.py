"""Reading stored events, their deliveries and attempts; replays and the dead-letter queue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import errors, models
from relay_server.store import queue, tables

D, E, OUT, B = tables.deliveries, tables.events, tables.outputs, tables.buckets


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    account_id: str
    bucket_id: str | None = None
    input_id: str | None = None
    state: models.DeliveryState | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 50


def delivery_from_row(row: Any) -> models.DeliveryInfo:
    return models.DeliveryInfo(
        id=row.id,
        event_id=row.event_id,
        output=row.output_name,
        state=models.DeliveryState(row.state),
        attempts=row.attempts,
        available_at=models.from_ms(row.available_at),
        lease_expires_at=None
        if row.lease_expires_at is None
        else models.from_ms(row.lease_expires_at),
        last_error=row.last_error,
        replay=bool(row.replay),
        updated_at=models.from_ms(row.updated_at),
    )


def _summary(row: Any, deliveries: Sequence[models.DeliveryInfo]) -> models.EventSummary:
    return models.EventSummary(
        id=row.id,
        bucket=row.bucket_name,
        input_id=row.input_id,
        method=row.method,
        path=row.path,
        size=row.size,
        received_at=models.from_ms(row.received_at),
        source=row.source,
        deliveries=tuple(deliveries),
    )


_SUMMARY_COLUMNS = (
    E.c.id,
    E.c.input_id,
    E.c.method,
    E.c.path,
    E.c.size,
    E.c.received_at,
    E.c.source,
    B.c.name.label("bucket_name"),
)


async def _deliveries_of(
    conn: AsyncConnection, event_ids: Sequence[str]
) -> dict[str, list[models.DeliveryInfo]]:
    rows = await conn.execute(
        sa.select(D, OUT.c.name.label("output_name"))
        .join(OUT, OUT.c.id == D.c.output_id)
        .where(D.c.event_id.in_(event_ids))
        .order_by(D.c.created_at)
    )
    found: dict[str, list[models.DeliveryInfo]] = {}
    for row in rows:
        found.setdefault(row.event_id, []).append(delivery_from_row(row))
    return found


async def list_events(conn: AsyncConnection, where: EventFilter) -> list[models.EventSummary]:
    query = sa.select(*_SUMMARY_COLUMNS).join(B, B.c.id == E.c.bucket_id)
    query = query.where(B.c.account_id == where.account_id)
    if where.bucket_id:
        query = query.where(E.c.bucket_id == where.bucket_id)
    if where.input_id:
        query = query.where(E.c.input_id == where.input_id)
    if where.since_ms is not None:
        query = query.where(E.c.received_at >= where.since_ms)
    if where.until_ms is not None:
        query = query.where(E.c.received_at < where.until_ms)
    if where.state:
        in_state = sa.select(D.c.event_id).where(D.c.state == where.state)
        if where.state is models.DeliveryState.DEAD:
            in_state = in_state.where(D.c.replaced_by.is_(None))
        query = query.where(E.c.id.in_(in_state))
    query = query.order_by(E.c.received_at.desc(), E.c.id.desc()).limit(where.limit)
    rows = (await conn.execute(query)).all()
    deliveries = await _deliveries_of(conn, [row.id for row in rows])
    return [_summary(row, deliveries.get(row.id, [])) for row in rows]


async def get_event(
    conn: AsyncConnection, account_id: str, event_id: str
) -> tuple[models.EventSummary, Any, list[models.AttemptInfo]]:
    """The event's summary, its sealed row, and its attempts, oldest first."""
    row = (
        await conn.execute(
            sa.select(E, B.c.name.label("bucket_name"))
            .join(B, B.c.id == E.c.bucket_id)
            .where(E.c.id == event_id, B.c.account_id == account_id)
        )
    ).first()
    if row is None:
        raise errors.NotFound(f"no event with id {event_id!r}")
    deliveries = (await _deliveries_of(conn, [event_id])).get(event_id, [])
    attempt_rows = await conn.execute(
        sa.select(tables.attempts)
        .where(tables.attempts.c.delivery_id.in_([d.id for d in deliveries]))
        .order_by(tables.attempts.c.ended_at, tables.attempts.c.id)
    )
    attempts = [
        models.AttemptInfo(
            delivery_id=a.delivery_id,
            attempt=a.attempt,
            outcome=models.Outcome(a.outcome),
            agent=a.agent,
            started_at=None if a.started_at is None else models.from_ms(a.started_at),
            ended_at=models.from_ms(a.ended_at),
            error=a.error,
        )
        for a in attempt_rows
    ]
    return _summary(row, deliveries), row, attempts


async def replay_event(
    conn: AsyncConnection, account_id: str, event_id: str, output: str | None
) -> list[str]:
    """Fresh PENDING deliveries of a stored event (all outputs, or one); returns their ids."""
    bucket_id = await conn.scalar(
        sa.select(E.c.bucket_id)
        .join(B, B.c.id == E.c.bucket_id)
        .where(E.c.id == event_id, B.c.account_id == account_id)
    )
    if bucket_id is None:
        raise errors.NotFound(f"no event with id {event_id!r}")
    outputs = sa.select(OUT.c.id).where(OUT.c.bucket_id == bucket_id)
    if output is not None:
        outputs = outputs.where(OUT.c.name == output)
    output_ids = list((await conn.execute(outputs)).scalars())
    if not output_ids:
        raise errors.NotFound(f"the event's bucket has no output {output!r}")
    now = models.now_ms()
    rows = [queue.new_delivery_row(event_id, out, now, replay=True) for out in output_ids]
    await conn.execute(D.insert(), rows)
    # A dead delivery of the same output is superseded: it leaves the DLQ listing.
    for row in rows:
        await conn.execute(
            D.update()
            .where(
                D.c.event_id == event_id,
                D.c.output_id == row["output_id"],
                D.c.state == models.DeliveryState.DEAD,
                D.c.replaced_by.is_(None),
            )
            .values(replaced_by=row["id"], updated_at=now)
        )
    return [str(row["id"]) for row in rows]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadFilter:
    """Which dead deliveries (still in the DLQ: not yet replaced by a replay) to pick."""

    account_id: str
    bucket_id: str | None = None
    input_id: str | None = None
    event_id: str | None = None
    received_before_ms: int | None = None  # the event is older than this
    received_after_ms: int | None = None  # the event is at least this recent
    error: str | None = None  # case-insensitive substring of last_error
    limit: int = 50


def _dead_conditions(where: DeadFilter) -> list[sa.ColumnElement[bool]]:
    conditions = [
        B.c.account_id == where.account_id,
        D.c.state == models.DeliveryState.DEAD,
        D.c.replaced_by.is_(None),
    ]
    if where.bucket_id is not None:
        conditions.append(OUT.c.bucket_id == where.bucket_id)
    if where.input_id is not None:
        conditions.append(E.c.input_id == where.input_id)
    if where.event_id is not None:
        conditions.append(D.c.event_id == where.event_id)
    if where.received_before_ms is not None:
        conditions.append(E.c.received_at < where.received_before_ms)
    if where.received_after_ms is not None:
        conditions.append(E.c.received_at >= where.received_after_ms)
    if where.error:
        conditions.append(D.c.last_error.icontains(where.error, autoescape=True))
    return conditions


def _dead_select(where: DeadFilter, *columns: Any) -> sa.Select[Any]:
    return (
        sa.select(*columns)
        .select_from(D)
        .join(OUT, OUT.c.id == D.c.output_id)
        .join(B, B.c.id == OUT.c.bucket_id)
        .join(E, E.c.id == D.c.event_id)
        .where(*_dead_conditions(where))
    )


async def list_dead(conn: AsyncConnection, where: DeadFilter) -> list[models.EventSummary]:
    """Events with a matching dead delivery, newest first (with all their deliveries)."""
    query = (
        sa.select(*_SUMMARY_COLUMNS)
        .join(B, B.c.id == E.c.bucket_id)
        .where(E.c.id.in_(_dead_select(where, D.c.event_id)))
        .order_by(E.c.received_at.desc(), E.c.id.desc())
        .limit(where.limit)
    )
    rows = (await conn.execute(query)).all()
    deliveries = await _deliveries_of(conn, [row.id for row in rows])
    return [_summary(row, deliveries.get(row.id, [])) for row in rows]


async def dead_deliveries(conn: AsyncConnection, where: DeadFilter) -> list[tuple[str, str, str]]:
    """(delivery id, event id, output name) of matching dead deliveries, oldest first."""
    rows = await conn.execute(
        _dead_select(where, D.c.id, D.c.event_id, OUT.c.name)
        .order_by(D.c.created_at, D.c.id)
        .limit(where.limit)
    )
    return [(row[0], row[1], row[2]) for row in rows]


async def replay_dead(conn: AsyncConnection, where: DeadFilter) -> list[str]:
    """Replay every matching dead delivery (to its own output); returns the new delivery ids."""
    created: list[str] = []
    for _delivery_id, event_id, output in await dead_deliveries(conn, where):
        created += await replay_event(conn, where.account_id, event_id, output)
    return created
