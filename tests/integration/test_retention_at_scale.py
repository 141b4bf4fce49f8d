"""Retention at scale: a pass costs what it deletes, not what it must keep.

An agent away for a week leaves a week of pending events at the front of its bucket; the
cleaner must neither delete them nor read through all of them again on every pass. On
PostgreSQL the rows a pass reads from events and from deliveries are counted by replaying
its statements under EXPLAIN ANALYZE, in a fresh database without planner statistics (as
where autovacuum is off); on both engines the walk's resume point, ties within one
millisecond and dead letters are checked. Migration 0006's autovacuum settings are checked
on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import models
from relay_server.store import database, retention, sql, tables
from tests import pg
from tests.integration.conftest import Installation
from tests.integration.test_migrations import run_sync_on
from tests.integration.test_store import incoming, settle
from tests.integration.test_store_policies import stored_event_ids, with_policy

HOUR = dt.timedelta(hours=1)
BODY = os.urandom(1024)
CHUNK = 2000


async def store_events(
    inst: Installation, route: models.Route, count: int, received: dt.datetime
) -> list[str]:
    """`count` events received 1 ms apart from `received`, through the store's ingest
    (CHUNK concurrent ingests are committed as one group)."""
    ids: list[str] = []
    for start in range(0, count, CHUNK):
        batch = [
            incoming(inst, BODY, route=route, received_at=received + dt.timedelta(milliseconds=n))
            for n in range(start, min(count, start + CHUNK))
        ]
        await asyncio.gather(*(inst.store.ingest(event) for event in batch))
        ids += [event.id for event in batch]
    return ids


async def acknowledge_all(inst: Installation) -> int:
    """Lease whatever is pending and ACK it, as an agent would."""
    done = 0
    for _ in range(100):
        leases = await inst.store.lease(
            inst.route.output_ids, limit=CHUNK, lease_ms=60_000, holder="t"
        )
        if not leases:
            return done
        await inst.store.settle([settle(item, models.Outcome.ACK) for item in leases], agent="t")
        done += len(leases)
    raise AssertionError("more to acknowledge than 100 batches")


@contextmanager
def statements(store: sql.SqlStore) -> Iterator[list[tuple[str, Any]]]:
    """Every statement the store sends while the block runs, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cur: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        seen.append((statement, parameters))

    engine = store.db.engine.sync_engine
    sa_event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa_event.remove(engine, "before_cursor_execute", record)


async def rows_read(store: sql.SqlStore, sent: list[tuple[str, Any]]) -> dict[str, int]:
    """Rows the SELECTs in `sent` read from events and from deliveries (returned, or read
    and filtered out), measured by running each again under EXPLAIN ANALYZE."""
    total = {"events": 0, "deliveries": 0}
    async with store.db.engine.connect() as conn:
        for statement, parameters in sent:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            plan = await conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters
            )
            found = plan.scalar_one()  # asyncpg may hand the JSON over decoded
            document = json.loads(found) if isinstance(found, str) else found
            for relation in total:
                total[relation] += _rows_on(document[0]["Plan"], relation)
        await conn.rollback()
    return total


def _rows_on(node: dict[str, Any], relation: str) -> int:
    own = 0
    if node.get("Relation Name") == relation:
        seen = sum(
            node.get(key, 0)
            for key in ("Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck")
        )
        own = seen * node["Actual Loops"]
    return own + sum(_rows_on(child, relation) for child in node.get("Plans", ()))


async def old_pending_backlog(inst: Installation, pending: int, settled: int) -> dict[str, Any]:
    """Retention 1 h; `pending` events received 3 h ago (never delivered), then `settled`
    delivered ones received 2 h ago behind them, then 5 young delivered ones."""
    route = await with_policy(inst, retention_ms=3_600_000)
    now = dt.datetime.now(dt.UTC)
    gone = await store_events(inst, route, settled, now - 2 * HOUR)
    young = await store_events(inst, route, 5, now - dt.timedelta(minutes=1))
    assert await acknowledge_all(inst) == settled + 5
    kept = await store_events(inst, route, pending, now - 3 * HOUR)
    return {"kept": kept, "gone": gone, "young": young, "oldest_ms": models.to_ms(now - 3 * HOUR)}


@pytest.mark.parametrize("engine", ["postgres"])
async def test_a_pass_reads_a_window_of_a_pending_backlog_not_all_of_it(
    installed: Installation,
) -> None:
    store, limit = installed.store, 100
    budget = retention.KEPT_WINDOWS_PER_PASS * limit  # kept rows a pass may walk past
    made = await old_pending_backlog(installed, pending=3 * budget, settled=3 * limit)
    sweep = retention.Sweep()

    with statements(store) as sent:
        removed = await store.clean(limit=limit, sweep=sweep)
    read = await rows_read(store, sent)
    assert removed["events"] == 0, "every old event in front is still pending"
    assert read["events"] <= budget + 2 * limit, (
        f"the pass read {read['events']} rows of events: a window at a time up to its "
        f"budget, not the {3 * budget} pending ones"
    )
    assert read["deliveries"] <= budget + 2 * limit, (
        f"the pass read {read['deliveries']} deliveries: the window's own, not every "
        "pending one for each window"
    )
    first = sweep.events[installed.bucket.id]
    assert first >= made["oldest_ms"] + budget - limit, "the walk moved on past its budget"

    with statements(store) as sent:
        removed = await store.clean(limit=limit, sweep=sweep)
    assert max((await rows_read(store, sent)).values()) <= budget + 2 * limit
    assert removed["events"] == 0 and sweep.events[installed.bucket.id] > first, (
        "the second pass resumed where the first stopped"
    )

    passes = 2
    while installed.bucket.id in sweep.events and passes < 6:  # until the walk comes round
        removed = await store.clean(limit=limit, sweep=sweep)
        passes += 1
    assert installed.bucket.id not in sweep.events, "the walk reached the end and starts over"
    remaining = set(await stored_event_ids(store))
    assert not remaining & set(made["gone"]), "the settled old events behind the backlog went"
    assert remaining == set(made["kept"]) | set(made["young"]), (
        "every pending old event and every young one stays"
    )


@pytest.mark.parametrize("engine", ["postgres"])
async def test_the_cleaner_skips_an_event_another_transaction_holds(
    installed: Installation,
) -> None:
    """A replay adding a delivery to an old event holds it (FOR KEY SHARE, the foreign key
    check); the cleaner goes past it instead of waiting, and takes it on a later pass."""
    store = installed.store
    made = await old_pending_backlog(installed, pending=0, settled=20)
    held = made["gone"][7]
    async with store.db.engine.connect() as other:
        await other.execute(
            sa.select(tables.events.c.id)
            .where(tables.events.c.id == held)
            .with_for_update(key_share=True)
        )
        started = time.monotonic()
        removed = await asyncio.wait_for(store.clean(limit=5), 10)
        assert time.monotonic() - started < 5, "the cleaner did not wait for the lock"
        assert removed["events"] == 19
        assert held in await stored_event_ids(store)
        await other.rollback()
    assert (await store.clean(limit=5))["events"] == 1
    assert held not in await stored_event_ids(store)


async def test_settled_events_sharing_a_millisecond_with_pending_ones_go(
    installed: Installation,
) -> None:
    """The index orders events by received_at only; windows of 3 over one millisecond
    holding 4 settled and 5 pending events still find every settled one."""
    store = installed.store
    route = await with_policy(installed, retention_ms=3_600_000)
    at = dt.datetime.now(dt.UTC) - 2 * HOUR
    settled = [incoming(installed, route=route, received_at=at) for _ in range(4)]
    for item in settled:
        await store.ingest(item)
    assert await acknowledge_all(installed) == 4
    pending = [incoming(installed, route=route, received_at=at) for _ in range(5)]
    for item in pending:
        await store.ingest(item)
    removed = await store.clean(limit=3)
    assert removed["events"] == 4
    assert set(await stored_event_ids(store)) == {item.id for item in pending}


async def test_a_walk_through_dead_letters_resumes_past_young_ones(
    installed: Installation,
) -> None:
    store, limit = installed.store, 1
    budget = retention.KEPT_WINDOWS_PER_PASS * limit
    await with_policy(installed, dlq_retention_ms=3_600_000)
    for _ in range(budget + 8):
        await store.ingest(incoming(installed))
    leases = await store.lease(installed.route.output_ids, limit=100, lease_ms=60_000, holder="t")
    await store.settle([settle(item, models.Outcome.REJECT) for item in leases], agent="t")
    deliveries = tables.deliveries
    async with store.db.read() as conn:
        dead = list(await conn.scalars(sa.select(deliveries.c.id).order_by(deliveries.c.id)))
    old = dead[-3:]  # died two hours ago, behind budget + 5 young dead letters

    async def age(conn: AsyncConnection) -> None:
        past = models.now_ms() - 7_200_000
        await conn.execute(
            deliveries.update().where(deliveries.c.id.in_(old)).values(updated_at=past)
        )

    await store.db.write(age)
    sweep = retention.Sweep()
    first = await store.clean(limit=limit, sweep=sweep)
    assert first["dead_letters"] == 0 and sweep.dead_letters, "stopped after its budget"
    second = await store.clean(limit=limit, sweep=sweep)
    assert second["dead_letters"] == 3, "the next pass resumed and reached the old ones"
    async with store.db.read() as conn:
        left = set(await conn.scalars(sa.select(deliveries.c.id)))
    assert left == set(dead) - set(old)


async def test_a_paced_pass_ends_at_once_when_the_cleaner_stops() -> None:
    sweep = retention.Sweep(busy_share=0.001)  # would pause 999 s after a 1 s batch
    sweep.stopping.set()
    started = time.monotonic()
    await sweep.rest(1.0)
    assert time.monotonic() - started < 0.5


# ---- migration 0006 ----------------------------------------------------------------------

TUNED = {"autovacuum_vacuum_scale_factor=0.02", "autovacuum_vacuum_threshold=1000"}


def reloptions(conn: sa.Connection) -> dict[str, set[str]]:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, c.reloptions, t.reloptions FROM pg_class c "
            "LEFT JOIN pg_class t ON t.oid = c.reltoastrelid "
            "WHERE c.relname IN ('events', 'deliveries', 'attempts')"
        )
    )
    found = {}
    for name, own, toast in rows:
        found[name] = set(own or ()) | {f"toast.{option}" for option in toast or ()}
    return found


async def test_0006_tunes_autovacuum_on_postgresql_and_is_undone_by_downgrade() -> None:
    async with pg.fresh_database("stowhook_0006") as url:

        def upgrade(conn: sa.Connection) -> dict[str, set[str]]:
            command.upgrade(database.migration_config(conn), "head")
            return reloptions(conn)

        def downgrade(conn: sa.Connection) -> dict[str, set[str]]:
            command.downgrade(database.migration_config(conn), "0005")
            return reloptions(conn)

        tuned = await run_sync_on(url, upgrade)
        for table in ("events", "deliveries", "attempts"):
            assert tuned[table] >= TUNED, table
        assert {f"toast.{option}" for option in TUNED} <= tuned["events"], "large bodies too"
        assert await run_sync_on(url, downgrade) == {
            "events": set(),
            "deliveries": set(),
            "attempts": set(),
        }
