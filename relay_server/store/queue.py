"""The delivery state machine in SQL: ingest, lease, settle, extend, reap, release.

Every transition is one statement guarded by (id, attempts, state), so a settlement for
an old lease (a smaller attempt number) never touches a newer one: that is the fencing.
Functions here run inside a write transaction handed in by `Database.write`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import crypto, ids, models, retry
from relay_server.store import replicas, tables

D = tables.deliveries
_T = TypeVar("_T")
E = tables.events

ACTIVE_STATES = (models.DeliveryState.PENDING, models.DeliveryState.LEASED)


# Built once: json.dumps with separators makes a new encoder on every call (~3 us).
_HEADERS_JSON = json.JSONEncoder(separators=(",", ":"))


def seal_event(
    keyring: crypto.KeyRing, event: models.IncomingEvent, *, body_file: bool = False
) -> dict[str, object]:
    """The events row for `event`, with query, headers and body sealed; with `body_file`
    an empty body is sealed in the row, and the caller writes the body's file."""
    headers = _HEADERS_JSON.encode(event.headers).encode()
    return {
        "id": event.id,
        "bucket_id": event.route.bucket.id,
        "input_id": event.route.input.id,
        "received_at": models.to_ms(event.received_at),
        "method": event.method,
        "path": event.path,
        "size": len(event.body),
        "source": event.source[:64],
        "query_sealed": keyring.seal(event.query.encode(), aad(event.id, "query")),
        "headers_sealed": keyring.seal(headers, aad(event.id, "headers")),
        "body_sealed": keyring.seal(b"" if body_file else event.body, aad(event.id, "body")),
        "body_file": body_file,
        "ephemeral": False,  # see store.ephemeral.held_row
        "caller_waits_until": event.caller_waits_until,
    }


def aad(event_id: str, field: str) -> bytes:
    return f"{event_id}:{field}".encode()


def open_payload(
    keyring: crypto.KeyRing, event_id: str, query: bytes, headers: bytes, body: bytes
) -> tuple[str, models.Headers, bytes]:
    plain_headers = json.loads(keyring.open(headers, aad(event_id, "headers")))
    return (
        keyring.open(query, aad(event_id, "query")).decode(),
        tuple((str(name), str(value)) for name, value in plain_headers),
        keyring.open(body, aad(event_id, "body")),
    )


def new_delivery_row(event_id: str, output_id: str, now: int, *, replay: bool) -> dict[str, object]:
    return {
        "id": ids.new_id(),
        "event_id": event_id,
        "output_id": output_id,
        "state": models.DeliveryState.PENDING,
        "attempts": 0,
        "available_at": now,
        "replay": replay,
        "created_at": now,
        "updated_at": now,
        # Every row names the same columns: one insert carries PENDING rows and rows
        # leased at ingest (slots) together.
        "leased_at": None,
        "lease_expires_at": None,
        "leased_by": None,
        "first_attempt_at": None,
    }


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A sealed events row on its way in, with what deduplication and replay checks need."""

    row: dict[str, object]
    bucket_id: str
    dedup_key: str | None = None
    dedup_window_ms: int = 0
    nonce: models.Nonce | None = None  # a timestamped signature's: a replay if seen before
    # Output id -> (holder, lease ms): an agent took a place for this event (models.Slot);
    # its delivery on that output, unless the output is ordered, is written LEASED to it.
    slots: Mapping[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ingested:
    """What became of one NewEvent: stored, a duplicate (nothing stored) or a replay (same)."""

    duplicate_of: str | None = None  # the earlier event holding the same dedup key
    replay: bool = False  # its nonce was seen: the very same signed webhook came before
    # (output id, delivery id, lease deadline ms) of each delivery written LEASED (slots).
    leased: tuple[tuple[str, str, int], ...] = ()

    @property
    def stored(self) -> bool:
        return self.duplicate_of is None and not self.replay


async def insert_events(conn: AsyncConnection, events: Sequence[NewEvent]) -> list[Ingested]:
    """Store each event with one PENDING delivery per output of its bucket.

    The nonce is recorded first, in this same transaction: if the write fails (the sender
    gets 503) the nonce is not kept either, so the sender's retry is not taken for a
    replay. A replay stores nothing and claims no dedup key. The outputs are read in this
    transaction, so an output added or removed a moment ago is honoured at once.
    """
    now = models.now_ms()
    results = [await _ingested(conn, event, now) for event in events]
    fresh = [event for event, result in zip(events, results, strict=True) if result.stored]
    if not fresh:
        return results
    await conn.execute(E.insert(), [event.row for event in fresh])
    rows = await conn.execute(
        sa.select(tables.outputs.c.bucket_id, tables.outputs.c.id, tables.outputs.c.ordered)
        .where(tables.outputs.c.bucket_id.in_({event.bucket_id for event in fresh}))
        .order_by(tables.outputs.c.id)
    )
    deliveries, waiting = delivery_rows(events, results, rows, now)
    if deliveries:
        await conn.execute(D.insert(), deliveries)
    if waiting:
        await replicas.publish(conn, waiting)
    return results


def delivery_rows(
    events: Sequence[NewEvent],
    results: list[Ingested],
    outputs: Iterable[Sequence[Any]],
    now: int,
) -> tuple[list[dict[str, object]], set[str]]:
    """The delivery rows of the stored events, one per output of their bucket, and the
    outputs that got a PENDING one. A delivery an agent has a slot for (and its output
    is not ordered) is written LEASED to it; `results` records those leases."""
    outputs_of: dict[str, list[tuple[str, bool]]] = {}
    for bucket_id, output_id, ordered in outputs:
        outputs_of.setdefault(bucket_id, []).append((output_id, bool(ordered)))
    deliveries: list[dict[str, object]] = []
    waiting: set[str] = set()  # outputs with a new PENDING delivery: other replicas look
    for index, event in enumerate(events):
        if not results[index].stored:
            continue
        leased: list[tuple[str, str, int]] = []
        for output_id, ordered in outputs_of.get(event.bucket_id, ()):
            row = new_delivery_row(str(event.row["id"]), output_id, now, replay=False)
            slot = None if ordered else event.slots.get(output_id)
            if slot is None:
                waiting.add(output_id)
            else:
                holder, lease_ms = slot
                row.update(_leased_values(now, lease_ms, holder), attempts=1, first_attempt_at=now)
                leased.append((output_id, str(row["id"]), now + lease_ms))
            deliveries.append(row)
        if leased:
            results[index] = dataclasses.replace(results[index], leased=tuple(leased))
    return deliveries, waiting


def _leased_values(now: int, lease_ms: int, holder: str) -> dict[str, object]:
    """The columns a lease sets (besides attempts), by a claim or at ingest (slots)."""
    return {
        "state": models.DeliveryState.LEASED,
        "leased_at": now,
        "lease_expires_at": now + lease_ms,
        "leased_by": holder,
        "updated_at": now,
    }


async def _ingested(conn: AsyncConnection, event: NewEvent, now: int) -> Ingested:
    if not await _claim_nonce(conn, event, now):
        return Ingested(replay=True)
    return Ingested(duplicate_of=await _claim_dedup_key(conn, event, now))


def _upsert(conn: AsyncConnection, table: sa.Table) -> Any:
    return (sqlite_insert if conn.dialect.name == "sqlite" else postgresql_insert)(table)


async def _claim_nonce(conn: AsyncConnection, event: NewEvent, now: int) -> bool:
    """Record the event's nonce; False if it is held already (and not expired): a replay."""
    if event.nonce is None:
        return True
    N = tables.seen_nonces
    statement = _upsert(conn, N).values(
        input_id=event.row["input_id"],
        nonce=event.nonce.value,
        expires_at=event.nonce.expires_at_ms,
    )
    upsert = statement.on_conflict_do_update(
        index_elements=[N.c.input_id, N.c.nonce],
        set_={"expires_at": statement.excluded.expires_at},
        where=N.c.expires_at <= now,
    ).returning(N.c.nonce)
    return (await conn.execute(upsert)).first() is not None


async def _claim_dedup_key(conn: AsyncConnection, event: NewEvent, now: int) -> str | None:
    """Take the event's dedup key; returns the earlier event's id if someone holds it.

    One upsert: insert the key, or take over a key whose window has passed. Under
    PostgreSQL a concurrent insert of the same key waits for the first to commit, so two
    duplicates racing each other still make one event.
    """
    if event.dedup_key is None:
        return None
    K = tables.dedup_keys
    statement = _upsert(conn, K).values(
        bucket_id=event.bucket_id,
        key=event.dedup_key,
        event_id=event.row["id"],
        expires_at=now + event.dedup_window_ms,
    )
    upsert = statement.on_conflict_do_update(
        index_elements=[K.c.bucket_id, K.c.key],
        set_={"event_id": statement.excluded.event_id, "expires_at": statement.excluded.expires_at},
        where=K.c.expires_at <= now,
    ).returning(K.c.event_id)
    if (await conn.execute(upsert)).first() is not None:
        return None
    original = await conn.scalar(
        sa.select(K.c.event_id).where(K.c.bucket_id == event.bucket_id, K.c.key == event.dedup_key)
    )
    return str(original)


@dataclass(frozen=True, slots=True, kw_only=True)
class RawLease:
    """A claimed delivery with its still-sealed event, ready to be opened outside the writer."""

    delivery_id: str
    attempt: int
    deadline_ms: int
    replay: bool
    output: str
    bucket: str
    event: Any  # the events row (and bucket_name): attribute access by column name


async def has_available(conn: AsyncConnection, output_ids: Sequence[str]) -> bool:
    """Is any delivery of `output_ids` ready to lease? (a read: no write lock taken)"""
    now = models.now_ms()
    ordered = await _ordered_outputs(conn, output_ids)
    free = [output_id for output_id in output_ids if output_id not in ordered]
    if free and await conn.scalar(_available(free, now).limit(1)) is not None:
        return True
    for output_id in ordered:
        if await _ordered_head(conn, output_id, now) is not None:
            return True
    return False


class Claimed(list[_T]):
    """What a claim leased (RawLease here, models.Lease once opened by the store).
    `ordered`: some of the outputs are ordered, so more deliveries may wait behind the
    heads just given (each needs the next claim after a settlement); None: not known,
    no claim was made."""

    ordered: bool | None = None


async def claim(
    conn: AsyncConnection,
    *,
    output_ids: Sequence[str],
    limit: int,
    lease_ms: int,
    holder: str,
) -> Claimed[RawLease]:
    """Lease up to `limit` available deliveries of `output_ids`, oldest first.

    An ordered output gives at most its head: its oldest delivery not yet settled, and
    only while that one is PENDING and due. DELIVERED and DEAD ones are out of the line,
    so a dead-lettered event never blocks the next.
    """
    now = models.now_ms()
    names: dict[str, str] = {}
    ordered = await _ordered_outputs(conn, output_ids, names)
    result: Claimed[RawLease] = Claimed()
    result.ordered = bool(ordered)
    heads: list[str] = []
    for output_id in sorted(ordered):
        if len(heads) == limit:
            break
        if conn.dialect.name == "postgresql":  # replicas claim one output's head in turn
            await conn.execute(
                sa.select(tables.outputs.c.id)
                .where(tables.outputs.c.id == output_id)
                .with_for_update()
            )
        head = await _ordered_head(conn, output_id, now)
        if head is not None:
            heads.append(head)
    free = [output_id for output_id in output_ids if output_id not in ordered]
    chosen = heads + await _oldest_available(conn, free, now, limit - len(heads))
    if not chosen:
        return result
    claimed = (
        await conn.execute(
            D.update()
            .where(D.c.id.in_(chosen), row_state(models.DeliveryState.PENDING))
            .values(
                {
                    **_leased_values(now, lease_ms, holder),
                    "attempts": D.c.attempts + 1,
                    "first_attempt_at": sa.func.coalesce(D.c.first_attempt_at, now),
                }
            )
            .returning(D.c.id, D.c.attempts, D.c.event_id, D.c.output_id, D.c.replay)
        )
    ).all()
    if claimed:
        result += await _with_events(conn, claimed, now + lease_ms, names)
    return result


async def _oldest_available(
    conn: AsyncConnection, output_ids: Sequence[str], now: int, limit: int
) -> list[str]:
    """The ids of the `limit` oldest due PENDING deliveries of `output_ids`.

    One query per output, each an ordered range of ix_deliveries_claim that stops after
    `limit` rows (equally old ones in index order), then merged: a single
    `output_id IN (...)` query would have to sort every due delivery of all the outputs,
    which costs as much as the backlog is long.
    """
    if limit <= 0 or not output_ids:
        return []
    found: list[tuple[int, str]] = []
    for output_id in output_ids:
        query = (
            sa.select(D.c.available_at, D.c.id)
            .where(
                D.c.output_id == output_id,
                D.c.state == models.DeliveryState.PENDING,
                D.c.available_at <= now,
            )
            # Not ", id": ties would then be sorted in full, and a replay or a restore
            # can make a million deliveries due in the same millisecond.
            .order_by(D.c.available_at)
            .limit(limit)
        )
        if conn.dialect.name == "postgresql":  # skip rows another replica is claiming
            query = query.with_for_update(skip_locked=True)
        found += [(int(row.available_at), str(row.id)) for row in await conn.execute(query)]
    return [delivery_id for _, delivery_id in sorted(found)[:limit]]


def _available(output_ids: Sequence[str], now: int) -> sa.Select[tuple[str]]:
    return sa.select(D.c.id).where(
        D.c.output_id.in_(output_ids),
        D.c.state == models.DeliveryState.PENDING,
        D.c.available_at <= now,
    )


async def _ordered_outputs(
    conn: AsyncConnection, output_ids: Sequence[str], names: dict[str, str] | None = None
) -> set[str]:
    """Which of `output_ids` are ordered; fills `names` (output id -> name) on the way."""
    outputs = tables.outputs
    rows = await conn.execute(
        sa.select(outputs.c.id, outputs.c.name, outputs.c.ordered).where(
            outputs.c.id.in_(output_ids)
        )
    )
    ordered: set[str] = set()
    for output_id, name, is_ordered in rows:
        if names is not None:
            names[output_id] = name
        if is_ordered:
            ordered.add(output_id)
    return ordered


async def _ordered_head(conn: AsyncConnection, output_id: str, now: int) -> str | None:
    """The id of the output's first unsettled delivery if it may be leased now, else None."""
    head = (
        await conn.execute(
            sa.select(D.c.id, D.c.state, D.c.available_at)
            .where(D.c.output_id == output_id, D.c.state.in_(ACTIVE_STATES))
            .order_by(D.c.id)
            .limit(1)
        )
    ).first()
    if head is None or head.state != models.DeliveryState.PENDING or head.available_at > now:
        return None
    return str(head.id)


async def _with_events(
    conn: AsyncConnection,
    claimed: Sequence[Any],
    deadline: int,
    output_names: dict[str, str],
) -> list[RawLease]:
    event_ids = {row.event_id for row in claimed}
    rows = (
        await conn.execute(
            sa.select(E, tables.buckets.c.name.label("bucket_name"))
            .join(tables.buckets, tables.buckets.c.id == E.c.bucket_id)
            .where(E.c.id.in_(event_ids))
        )
    ).all()
    return raw_leases(claimed, rows, deadline, output_names)


def raw_leases(
    claimed: Sequence[Any], events: Iterable[Any], deadline: int, output_names: dict[str, str]
) -> list[RawLease]:
    """The leases of `claimed` deliveries (id, attempts, event_id, output_id, replay) with
    their `events` rows, oldest event first."""
    by_id = {row.id: row for row in events}
    leases = [
        RawLease(
            delivery_id=row.id,
            attempt=row.attempts,
            deadline_ms=deadline,
            replay=bool(row.replay),
            output=output_names[row.output_id],
            bucket=by_id[row.event_id].bucket_name,
            event=by_id[row.event_id],
        )
        for row in claimed
    ]
    leases.sort(key=lambda lease: (lease.event.received_at, lease.delivery_id))
    return leases


async def _lock_in_order(conn: AsyncConnection, lease_ids: Sequence[str]) -> None:
    """PostgreSQL: lock the deliveries a settlement or extension batch touches, in id order.

    Batches reach the same rows in different orders (an ACK batch by index, an extend
    frame as the agent listed it, the reaper by deadline); two holding each other's rows
    was a deadlock that lost a whole batch. Taking every row first in one order cannot
    deadlock with another batch doing the same.
    """
    if conn.dialect.name != "postgresql" or len(lease_ids) < 2:
        return
    delivery_ids = set()
    for lease_id in lease_ids:
        with contextlib.suppress(ValueError):  # malformed ids are reported lost later
            delivery_ids.add(models.parse_lease_id(lease_id)[0])
    await conn.execute(
        sa.select(D.c.id).where(D.c.id.in_(sorted(delivery_ids))).order_by(D.c.id).with_for_update()
    )


def row_state(*states: models.DeliveryState) -> sa.ColumnElement[bool]:
    """The state is one of `states`, checked on rows found otherwise (by id, by event),
    never searched through an index on state.

    With an id IN (...) list and no statistics, SQLite's planner prefers the index on
    state to the primary key, and then visits every pending delivery: a claim of 64
    took 24 ms with 200k pending, 0.1 ms by primary key.
    """
    unindexed = sa.func.coalesce(D.c.state, "")
    return unindexed == states[0] if len(states) == 1 else unindexed.in_(states)


def _fenced(delivery_id: str, attempt: int) -> sa.ColumnElement[bool]:
    return sa.and_(
        D.c.id == delivery_id,
        D.c.attempts == attempt,
        D.c.state == models.DeliveryState.LEASED,
    )


async def settle(
    conn: AsyncConnection,
    settlements: Sequence[models.Settlement],
    *,
    agent: str,
    base_policy: retry.RetryPolicy,
) -> list[str]:
    """Apply agent verdicts; returns the lease ids that were no longer held."""
    await _lock_in_order(conn, [item.lease_id for item in settlements])
    lost: list[str] = []
    acks: dict[tuple[str, int], str] = {}
    for item in settlements:
        try:
            delivery_id, attempt = models.parse_lease_id(item.lease_id)
        except ValueError:
            lost.append(item.lease_id)
            continue
        if item.outcome is models.Outcome.ACK:
            acks[(delivery_id, attempt)] = item.lease_id
            continue
        if item.outcome is models.Outcome.REJECT:
            done = await _finish(
                conn, delivery_id, attempt, models.DeliveryState.DEAD, _error_text(item)
            )
        else:
            done = await _fail(conn, delivery_id, attempt, item, base_policy)
        if done is None:
            lost.append(item.lease_id)
        else:
            await _record_attempts(conn, [(delivery_id, attempt, done)], item, agent)
    if acks:
        lost += await _ack_all(conn, acks, agent)
    return lost


async def _ack_all(
    conn: AsyncConnection, acks: dict[tuple[str, int], str], agent: str
) -> list[str]:
    """Every held lease in `acks` becomes DELIVERED in one statement; returns the rest."""
    now = models.now_ms()
    done = (
        await conn.execute(
            D.update()
            .where(
                D.c.id.in_([delivery_id for delivery_id, _ in acks]),  # by primary key
                sa.tuple_(D.c.id, D.c.attempts).in_(list(acks)),
                row_state(models.DeliveryState.LEASED),
            )
            .values(
                state=models.DeliveryState.DELIVERED,
                lease_expires_at=None,
                last_error=None,
                updated_at=now,
            )
            .returning(D.c.id, D.c.attempts, D.c.leased_at)
        )
    ).all()
    item = models.Settlement(lease_id="", outcome=models.Outcome.ACK)
    await _record_attempts(
        conn, [(row.id, row.attempts, int(row.leased_at or now)) for row in done], item, agent
    )
    settled = {(row.id, row.attempts) for row in done}
    return [lease_id for key, lease_id in acks.items() if key not in settled]


async def _finish(
    conn: AsyncConnection,
    delivery_id: str,
    attempt: int,
    state: models.DeliveryState,
    error: str | None,
) -> int | None:
    """Move a held lease to a final state; returns when it was leased, None if not held."""
    now = models.now_ms()
    row = (
        await conn.execute(
            D.update()
            .where(_fenced(delivery_id, attempt))
            .values(state=state, lease_expires_at=None, last_error=error, updated_at=now)
            .returning(D.c.leased_at)
        )
    ).first()
    return None if row is None else int(row.leased_at or now)


async def _fail(
    conn: AsyncConnection,
    delivery_id: str,
    attempt: int,
    item: models.Settlement,
    base_policy: retry.RetryPolicy,
) -> int | None:
    """A failed attempt: back to PENDING after a delay, or DEAD when out of tries."""
    query = (
        sa.select(
            D.c.leased_at,
            D.c.first_attempt_at,
            tables.buckets.c.max_attempts,
            tables.buckets.c.max_age_ms,
        )
        .join(tables.outputs, tables.outputs.c.id == D.c.output_id)
        .join(tables.buckets, tables.buckets.c.id == tables.outputs.c.bucket_id)
        .where(_fenced(delivery_id, attempt))
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=D)
    row = (await conn.execute(query)).first()
    if row is None:
        return None
    now = models.now_ms()
    policy = retry.RetryPolicy(
        initial_ms=base_policy.initial_ms,
        factor=base_policy.factor,
        cap_ms=base_policy.cap_ms,
        max_attempts=row.max_attempts,
        max_age_ms=row.max_age_ms,
    )
    decision = retry.after_failure(
        policy,
        attempts=attempt,
        first_attempt_ms=int(row.first_attempt_at or now),
        now_ms=now,
        retry_after_ms=item.retry_after_ms,
    )
    await conn.execute(
        D.update()
        .where(_fenced(delivery_id, attempt))
        .values(
            state=decision.state,
            available_at=decision.available_at_ms,
            lease_expires_at=None,
            leased_by=None,
            last_error=_error_text(item),
            updated_at=now,
        )
    )
    return int(row.leased_at or now)


def _error_text(item: models.Settlement) -> str:
    reason = item.reason.strip()[:500]
    return f"{item.outcome}: {reason}" if reason else str(item.outcome)


async def _record_attempts(
    conn: AsyncConnection,
    done: Sequence[tuple[str, int, int]],
    item: models.Settlement,
    agent: str,
) -> None:
    """One attempts row per (delivery_id, attempt, started_at), all with item's outcome."""
    if not done:
        return
    now = models.now_ms()
    await conn.execute(
        tables.attempts.insert(),
        [
            {
                "delivery_id": delivery_id,
                "attempt": attempt,
                "outcome": item.outcome,
                "agent": agent[:200],
                "started_at": started_at,
                "ended_at": now,
                "error": item.reason[:500] or None,
            }
            for delivery_id, attempt, started_at in done
        ],
    )


async def extend(conn: AsyncConnection, lease_ids: Sequence[str], extend_ms: int) -> list[str]:
    """Move lease deadlines to now + extend_ms; returns the lease ids no longer held."""
    lost = []
    deadline = models.now_ms() + extend_ms
    await _lock_in_order(conn, lease_ids)
    for lease_id in lease_ids:
        try:
            delivery_id, attempt = models.parse_lease_id(lease_id)
        except ValueError:
            lost.append(lease_id)
            continue
        result = await conn.execute(
            D.update().where(_fenced(delivery_id, attempt)).values(lease_expires_at=deadline)
        )
        if result.rowcount != 1:
            lost.append(lease_id)
    return lost


async def expired_leases(conn: AsyncConnection, limit: int) -> list[str]:
    """The oldest leases past their deadline. On PostgreSQL they are locked here, at
    once, skipping any an ACK is settling right now: the reaper then never waits for a
    row an ACK holds while the ACK waits for one it holds (a deadlock that lost the
    whole ACK batch when the two met)."""
    now = models.now_ms()
    query = (
        sa.select(D.c.id, D.c.attempts)
        .where(D.c.state == models.DeliveryState.LEASED, D.c.lease_expires_at < now)
        .order_by(D.c.lease_expires_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = await conn.execute(query)
    return [models.format_lease_id(row.id, row.attempts) for row in rows]


async def reap(conn: AsyncConnection, *, limit: int, base_policy: retry.RetryPolicy) -> list[str]:
    """Count every lease past its deadline as a failed attempt; returns their lease ids.

    With several replicas, one reaps at a time (the others skip this round): each expiry
    is fenced anyway, this only spares them lock waits and deadlocks on the same rows.
    """
    if not await replicas.exclusive(conn, "reap"):
        return []
    lease_ids = await expired_leases(conn, limit)
    settlements = [
        models.Settlement(
            lease_id=lease_id,
            outcome=models.Outcome.LEASE_EXPIRED,
            reason="lease expired before the agent settled it",
        )
        for lease_id in lease_ids
    ]
    lost = await settle(conn, settlements, agent="reaper", base_policy=base_policy)
    return [lease_id for lease_id in lease_ids if lease_id not in lost]
