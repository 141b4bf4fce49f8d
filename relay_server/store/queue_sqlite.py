"""The queue's hottest transitions again, in plain sqlite3, for SQLite's writer thread.

Each is a plain write (`database.PlainWrites`), run in the thread aiosqlite runs the
connection in, inside a group's transaction: no hop to the event loop between
statements, where through SQLAlchemy each statement is a hop of its own, and under load
each hop waits behind every request the loop has queued (a claim took 8 ms, a group of
64 ingests 11). They write and return exactly what their SQLAlchemy twins in queue.py
do (which PostgreSQL runs), checked value for value by
tests/integration/test_sqlite_ops.py, and find rows by key as
tests/integration/test_query_plans.py checks.
"""

from __future__ import annotations

import collections
import functools
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from relay_server import models
from relay_server.store import tables
from relay_server.store.queue import (
    ACTIVE_STATES,
    Claimed,
    Ingested,
    NewEvent,
    RawLease,
    delivery_rows,
    raw_leases,
)

PENDING, LEASED = models.DeliveryState.PENDING, models.DeliveryState.LEASED


def insert_events(db: sqlite3.Connection, events: Sequence[NewEvent]) -> list[Ingested]:
    """queue.insert_events."""
    now = models.now_ms()
    results = [_ingested(db, event, now) for event in events]
    fresh = [event for event, result in zip(events, results, strict=True) if result.stored]
    if not fresh:
        return results
    _insert_rows(db, tables.events, [event.row for event in fresh])
    buckets = sorted({event.bucket_id for event in fresh})
    rows = db.execute(
        f"SELECT bucket_id, id, ordered FROM outputs WHERE bucket_id IN ({_marks(buckets)})"
        " ORDER BY id",
        buckets,
    )
    deliveries, _ = delivery_rows(events, results, rows, now)  # no other replica to tell
    if deliveries:
        _insert_rows(db, tables.deliveries, deliveries)
    return results


def _ingested(db: sqlite3.Connection, event: NewEvent, now: int) -> Ingested:
    """queue._ingested: the same two upserts as _claim_nonce and _claim_dedup_key."""
    if event.nonce is not None:
        claimed = db.execute(
            "INSERT INTO seen_nonces (input_id, nonce, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (input_id, nonce) DO UPDATE SET expires_at = excluded.expires_at"
            " WHERE seen_nonces.expires_at <= ? RETURNING nonce",
            (event.row["input_id"], event.nonce.value, event.nonce.expires_at_ms, now),
        ).fetchall()
        if not claimed:
            return Ingested(replay=True)
    if event.dedup_key is None:
        return Ingested()
    key = (event.bucket_id, event.dedup_key)
    claimed = db.execute(
        "INSERT INTO dedup_keys (bucket_id, key, event_id, expires_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (bucket_id, key) DO UPDATE"
        " SET event_id = excluded.event_id, expires_at = excluded.expires_at"
        " WHERE dedup_keys.expires_at <= ? RETURNING event_id",
        (*key, event.row["id"], now + event.dedup_window_ms, now),
    ).fetchall()
    if claimed:
        return Ingested()
    (original,) = db.execute(
        "SELECT event_id FROM dedup_keys WHERE bucket_id = ? AND key = ?", key
    ).fetchone()
    return Ingested(duplicate_of=str(original))


def claim(
    db: sqlite3.Connection,
    *,
    output_ids: Sequence[str],
    limit: int,
    lease_ms: int,
    holder: str,
) -> Claimed[RawLease]:
    """queue.claim: an ordered output gives at most its head, the others their oldest."""
    now = models.now_ms()
    names: dict[str, str] = {}
    ordered: set[str] = set()
    for output_id, name, is_ordered in db.execute(
        f"SELECT id, name, ordered FROM outputs WHERE id IN ({_marks(output_ids)})", output_ids
    ):
        names[output_id] = name
        if is_ordered:
            ordered.add(output_id)
    result: Claimed[RawLease] = Claimed()
    result.ordered = bool(ordered)
    heads: list[str] = []
    for output_id in sorted(ordered):
        if len(heads) == limit:
            break
        head = db.execute(
            "SELECT id, state, available_at FROM deliveries"
            " WHERE output_id = ? AND state IN (?, ?) ORDER BY id LIMIT 1",
            (output_id, *ACTIVE_STATES),
        ).fetchone()
        if head is not None and head[1] == PENDING and head[2] <= now:
            heads.append(head[0])
    room = limit - len(heads)
    found: list[tuple[int, str]] = []
    for output_id in output_ids if room > 0 else ():
        if output_id not in ordered:  # by ix_deliveries_claim, as queue._oldest_available
            found += db.execute(
                "SELECT available_at, id FROM deliveries"
                " WHERE output_id = ? AND state = ? AND available_at <= ?"
                " ORDER BY available_at LIMIT ?",
                (output_id, PENDING, now, room),
            ).fetchall()
    chosen = heads + [delivery_id for _, delivery_id in sorted(found)[:room]]
    if not chosen:
        return result
    claimed = _named(
        db,
        "UPDATE deliveries SET state = ?, leased_at = ?, lease_expires_at = ?, leased_by = ?,"
        " updated_at = ?, attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, ?)"
        f" WHERE id IN ({_marks(chosen)}) AND coalesce(state, '') = ?"
        " RETURNING id, attempts, event_id, output_id, replay",
        [LEASED, now, now + lease_ms, holder, now, now, *chosen, PENDING],
    )
    if claimed:
        event_ids = sorted({row.event_id for row in claimed})
        events = _named(
            db,
            "SELECT events.*, buckets.name AS bucket_name FROM events"
            " JOIN buckets ON buckets.id = events.bucket_id"
            f" WHERE events.id IN ({_marks(event_ids)})",
            event_ids,
        )
        result += raw_leases(claimed, events, now + lease_ms, names)
    return result


def settle_acks(
    db: sqlite3.Connection, settlements: Sequence[models.Settlement], *, agent: str
) -> list[str]:
    """queue.settle for a batch of ACKs only (the common case); returns the lease ids
    no longer held, malformed ones included."""
    lost: list[str] = []
    acks: dict[tuple[str, int], str] = {}
    for item in settlements:
        assert item.outcome is models.Outcome.ACK, item.outcome
        try:
            acks[models.parse_lease_id(item.lease_id)] = item.lease_id
        except ValueError:
            lost.append(item.lease_id)
    return lost + (_ack_all(db, acks, agent) if acks else [])


def _ack_all(db: sqlite3.Connection, acks: Mapping[tuple[str, int], str], agent: str) -> list[str]:
    """queue._ack_all: every held lease in `acks` DELIVERED; returns the lease ids not held."""
    now = models.now_ms()
    keys = list(acks)
    done = db.execute(
        "UPDATE deliveries SET state = ?, lease_expires_at = NULL, last_error = NULL,"
        f" updated_at = ? WHERE id IN ({_marks(keys)})"  # by primary key
        f" AND (id, attempts) IN (VALUES {', '.join(['(?, ?)'] * len(keys))})"
        " AND coalesce(state, '') = ? RETURNING id, attempts, leased_at",
        [
            models.DeliveryState.DELIVERED,
            now,
            *(delivery_id for delivery_id, _ in keys),
            *(part for key in keys for part in key),
            LEASED,
        ],
    ).fetchall()
    if done:
        attempts = [
            {
                "delivery_id": delivery_id,
                "attempt": attempt,
                "outcome": models.Outcome.ACK,
                "agent": agent[:200],
                "started_at": leased_at or now,
                "ended_at": now,
                "error": None,
            }
            for delivery_id, attempt, leased_at in done
        ]
        _insert_rows(db, tables.attempts, attempts)
    settled = {(delivery_id, attempt) for delivery_id, attempt, _ in done}
    return [lease_id for key, lease_id in acks.items() if key not in settled]


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


def _named(db: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[Any]:
    """The rows of `sql`, each a named tuple: row.column, as SQLAlchemy's rows read."""
    cursor = db.execute(sql, params)
    row_type = _row_type(tuple(column[0] for column in cursor.description))
    return [row_type._make(row) for row in cursor]


@functools.cache
def _row_type(columns: tuple[str, ...]) -> Any:
    return collections.namedtuple("Row", columns)


# Rows per multi-row INSERT: at most 64, and fewer than 999 parameters, the limit of
# SQLite builds before 3.32. And bytes: sqlite3 copies every bound blob, so a statement
# binds about 1 MiB of them at most (ten 10 MiB bodies at once would hold 100 MiB).
INSERT_CHUNK_ROWS = 64
MAX_PARAMETERS = 999
INSERT_CHUNK_BYTES = 2**20


def _insert_rows(
    db: sqlite3.Connection, table: sa.Table, rows: Sequence[Mapping[str, object]]
) -> None:
    """INSERT `rows` (each naming the same columns), several per statement.

    One statement for many rows, not executemany: sqlite3 lets go of the GIL around every
    step, and each step's return waits for a busy event loop to give it back.
    """
    columns = tuple(rows[0])
    per_statement = min(INSERT_CHUNK_ROWS, MAX_PARAMETERS // len(columns))
    chunk: list[object] = []
    count = size = 0
    for row in rows:
        values = [row[column] for column in columns]
        chunk += values
        count += 1
        size += sum(len(value) for value in values if isinstance(value, bytes))
        if count == per_statement or size >= INSERT_CHUNK_BYTES:
            db.execute(_insert_sql(table, columns, count), chunk)
            chunk, count, size = [], 0, 0
    if count:
        db.execute(_insert_sql(table, columns, count), chunk)


@functools.cache
def _insert_sql(table: sa.Table, columns: tuple[str, ...], rows: int) -> str:
    assert all(column in table.c for column in columns), columns
    one = f"({', '.join('?' * len(columns))})"
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}"
