"""The queue's hot statements find their rows by key, however long the backlog (SQLite).

A claim or an ACK that searched an index on state visits every pending (or leased)
delivery: with 200k pending a claim of 64 took 24 ms instead of 0.1 ms. Each statement a
claim, an ACK and an ephemeral settlement run is explained here with its own parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from relay_server import models
from relay_server.store import sql
from tests.integration.conftest import Installation
from tests.integration.test_store import incoming, lease, settle

pytestmark = pytest.mark.sqlite_only("EXPLAIN QUERY PLAN is SQLite's")


@contextlib.asynccontextmanager
async def recorded(store: sql.SqlStore) -> AsyncIterator[list[tuple[str, Any]]]:
    """Every statement run meanwhile: through SQLAlchemy (with its parameters), and in
    plain sqlite3 on the writer's connection (queue_sqlite, parameters filled in)."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        seen.append((statement, params))

    engine = store.db.engine.sync_engine
    writer = (await (await store.db._writer_conn()).get_raw_connection()).driver_connection
    assert writer is not None
    sa.event.listen(engine, "before_cursor_execute", record)
    await writer.set_trace_callback(lambda statement: seen.append((statement, ())))
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
        await writer.set_trace_callback(None)


def full_searches(path: str, statements: list[tuple[str, Any]]) -> list[str]:
    """Plans that scan deliveries or search it by state alone."""
    bad = []
    with contextlib.closing(sqlite3.connect(path)) as db:
        for statement, params in statements:
            if "deliveries" not in statement or statement.startswith(("BEGIN", "COMMIT")):
                continue
            for *_, detail in db.execute("EXPLAIN QUERY PLAN " + statement, params or ()):
                by_state = "ix_deliveries_lease (state=?)" in detail
                if detail.startswith("SCAN deliveries") or by_state:
                    bad.append(f"{detail}: {statement.split(chr(10))[0]}")
    return bad


async def test_claims_and_acks_find_deliveries_by_key(installed: Installation) -> None:
    store = installed.store
    events = [incoming(installed) for _ in range(300)]
    await asyncio.gather(*(store.ingest(e) for e in events))
    path = str(store.db.engine.url.database)

    async with recorded(store) as statements:
        taken = await lease(store, installed, limit=64)
        await store.settle([settle(t, models.Outcome.ACK) for t in taken], agent="t")

    assert len(taken) == 64
    assert [s for s, _ in statements if s.startswith(("UPDATE deliveries", "SELECT available_at"))]
    assert full_searches(path, statements) == []
