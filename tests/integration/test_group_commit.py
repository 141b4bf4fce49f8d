"""SQLite group commit on a real file: coalesced writes survive a neighbour that breaks
their group (each is retried alone, with the same items)."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Sequence

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server.store import database

SETTLE_S = 0.05  # long enough for queued writes to reach the writer's queue


@pytest.fixture
async def db(tmp_path: pathlib.Path) -> AsyncIterator[database.Database]:
    opened = database.Database(database.DatabaseSettings(url=f"sqlite:///{tmp_path / 'g.db'}"))
    await opened.open()

    async def create(conn: AsyncConnection) -> None:
        await conn.execute(sa.text("CREATE TABLE t (v INTEGER NOT NULL)"))

    await opened.write(create)
    try:
        yield opened
    finally:
        await opened.close()


async def insert_many(conn: AsyncConnection, items: list[int]) -> Sequence[int]:
    await conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": v} for v in items])
    return items


async def test_coalesced_items_are_retried_alone_when_a_neighbour_breaks_the_group(
    db: database.Database,
) -> None:
    release = asyncio.Event()

    async def hold(conn: AsyncConnection) -> None:
        await release.wait()  # keeps the writer busy while the next group queues up

    async def broken(conn: AsyncConnection) -> None:
        raise ValueError("this operation always fails")

    holding = asyncio.create_task(db.write(hold))
    await asyncio.sleep(SETTLE_S)
    stored = [asyncio.create_task(db.write_coalesced("t", insert_many, v)) for v in (1, 2, 3)]
    await asyncio.sleep(SETTLE_S)
    failing = asyncio.create_task(db.write(broken))  # after the coalesced op, same group
    await asyncio.sleep(SETTLE_S)
    release.set()
    await holding

    with pytest.raises(ValueError, match="always fails"):
        await failing
    assert await asyncio.wait_for(asyncio.gather(*stored), 5) == [1, 2, 3]

    async def stored_values(conn: AsyncConnection) -> list[int]:
        return list((await conn.execute(sa.text("SELECT v FROM t ORDER BY v"))).scalars())

    assert await db.write(stored_values) == [1, 2, 3]
