"""SQLite group commit on a real file: coalesced writes survive a neighbour that breaks
their group (each is retried alone, with the same items)."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Sequence

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import errors
from relay_server.store import database

SETTLE_S = 0.05  # long enough for queued writes to reach the writer's queue


@pytest.fixture
async def db(tmp_path: pathlib.Path) -> AsyncIterator[database.Database]:
    settings = database.DatabaseSettings(
        url=f"sqlite:///{tmp_path / 'g.db'}", sqlite_busy_timeout_ms=200
    )
    opened = database.Database(settings)
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


def insert_many_sqlite(db: sqlite3.Connection, items: list[int]) -> Sequence[int]:
    db.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in items])
    return items


async def stored_values(conn: AsyncConnection) -> list[int]:
    return list((await conn.execute(sa.text("SELECT v FROM t ORDER BY v"))).scalars())


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

    assert await db.write(stored_values) == [1, 2, 3]


@pytest.mark.parametrize("neighbour", ["none", "sqlalchemy"])
async def test_plain_sqlite_writes_commit_in_one_group_alone_or_beside_sqlalchemy_ones(
    db: database.Database, neighbour: str
) -> None:
    release = asyncio.Event()

    async def hold(conn: AsyncConnection) -> None:
        await release.wait()

    holding = asyncio.create_task(db.write(hold))
    await asyncio.sleep(SETTLE_S)
    stored = [
        asyncio.create_task(db.write_coalesced("t", insert_many, v, sqlite_many=insert_many_sqlite))
        for v in (1, 2, 3)
    ]
    if neighbour == "sqlalchemy":
        stored.append(asyncio.create_task(db.write_coalesced("u", insert_many, 4)))
    await asyncio.sleep(SETTLE_S)
    release.set()
    await holding

    assert await asyncio.wait_for(asyncio.gather(*stored), 5) == [1, 2, 3, 4][: len(stored)]
    assert await db.write(stored_values) == [1, 2, 3, 4][: len(stored)]


async def test_a_plain_sqlite_write_that_breaks_rolls_back_whole_and_says_why(
    db: database.Database,
) -> None:
    def half_then_fail(db: sqlite3.Connection, items: list[int]) -> Sequence[int]:
        db.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in items])
        db.execute("INSERT INTO missing_table (v) VALUES (1)")
        return items

    with pytest.raises(errors.StorageError, match="no such table: missing_table"):
        await db.write_coalesced("t", insert_many, 7, sqlite_many=half_then_fail)
    assert await db.write(stored_values) == []  # the rows inserted before the error are gone
    assert await db.write_coalesced("t", insert_many, 8, sqlite_many=insert_many_sqlite) == 8
    assert await db.write(stored_values) == [8]


async def test_a_locked_database_fails_plain_sqlite_writes_as_unavailable(
    db: database.Database, tmp_path: pathlib.Path
) -> None:
    other = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(errors.StorageUnavailable, match="database is locked"):
            await db.write_coalesced("t", insert_many, 1, sqlite_many=insert_many_sqlite)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await db.write_coalesced("t", insert_many, 2, sqlite_many=insert_many_sqlite) == 2
