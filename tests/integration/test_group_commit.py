"""SQLite group commit on a real file: coalesced writes survive a neighbour that breaks
their group (each is retried alone, with the same items), plain sqlite3 writes commit in
the writer's thread, and closing ends the group under way before failing the rest."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import threading
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


def _held_drain() -> tuple[threading.Event, database.PlainWrite[None]]:
    """A plain write that keeps the writer's thread busy until the event is set."""
    release = threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        release.wait(5)

    return release, hold


async def test_a_plain_write_that_breaks_its_group_fails_alone(db: database.Database) -> None:
    release, hold = _held_drain()

    def broken(db: sqlite3.Connection, items: list[int]) -> Sequence[int]:
        raise ValueError("this write always fails")

    holding = asyncio.create_task(db.write(stored_values, sqlite=hold))
    await asyncio.sleep(SETTLE_S)
    # Taken together by the drain once `hold` commits: one group, one bad write in it.
    stored = [
        asyncio.create_task(db.write_coalesced("t", insert_many, v, sqlite_many=insert_many_sqlite))
        for v in (1, 2)
    ]
    failing = asyncio.create_task(db.write_coalesced("bad", insert_many, 9, sqlite_many=broken))
    await asyncio.sleep(SETTLE_S)
    release.set()
    await holding

    with pytest.raises(ValueError, match="always fails"):
        await failing
    assert await asyncio.wait_for(asyncio.gather(*stored), 5) == [1, 2]
    assert await db.write(stored_values) == [1, 2]


async def test_closing_lets_the_group_under_way_commit_and_fails_the_writes_still_waiting(
    tmp_path: pathlib.Path,
) -> None:
    settings = database.DatabaseSettings(url=f"sqlite:///{tmp_path / 'c.db'}")
    opened = database.Database(settings)
    await opened.open()
    await opened.write(lambda conn: conn.execute(sa.text("CREATE TABLE t (v INTEGER)")))
    release, hold = _held_drain()

    def hold_then_insert(db: sqlite3.Connection) -> int:
        hold(db)
        db.execute("INSERT INTO t (v) VALUES (1)")
        return 1

    under_way = asyncio.create_task(opened.write(stored_values, sqlite=hold_then_insert))
    await asyncio.sleep(SETTLE_S)
    waiting = asyncio.create_task(
        opened.write_coalesced("t", insert_many, 2, sqlite_many=insert_many_sqlite)
    )
    await asyncio.sleep(SETTLE_S)
    closing = asyncio.create_task(opened.close())
    await asyncio.sleep(SETTLE_S)
    release.set()
    await asyncio.wait_for(closing, 10)

    assert under_way.result() == 1  # committed: the caller got its answer
    with pytest.raises(errors.StorageUnavailable, match="database is closing"):
        waiting.result()
    on_disk = sqlite3.connect(tmp_path / "c.db")
    try:
        assert on_disk.execute("SELECT v FROM t").fetchall() == [(1,)]
    finally:
        on_disk.close()


def synchronous_now(db: sqlite3.Connection) -> int:
    """The commit level the write runs under: 1 NORMAL, 2 FULL (PRAGMA synchronous)."""
    level: int = db.execute("PRAGMA synchronous").fetchone()[0]
    return level


async def synchronous_sqlalchemy(conn: AsyncConnection) -> int:
    level: int = (await conn.execute(sa.text("PRAGMA synchronous"))).scalar_one()
    return level


async def test_lease_and_ack_writes_commit_without_an_fsync_unless_grouped_with_a_durable_one(
    db: database.Database,
) -> None:
    # Alone, a non-durable write commits at NORMAL: WAL append, no fsync of its own.
    assert await db.write(synchronous_sqlalchemy, sqlite=synchronous_now, durable=False) == 1
    # The connection is back at FULL for what follows: a durable plain write, an SA write.
    assert await db.write(synchronous_sqlalchemy, sqlite=synchronous_now) == 2
    assert await db.write(synchronous_sqlalchemy) == 2
    # In one group with a durable write (an ingest), it commits at FULL with it.
    release, hold = _held_drain()
    holding = asyncio.create_task(db.write(stored_values, sqlite=hold))
    await asyncio.sleep(SETTLE_S)
    grouped = [
        asyncio.create_task(db.write(synchronous_sqlalchemy, sqlite=synchronous_now, durable=d))
        for d in (False, True)
    ]
    await asyncio.sleep(SETTLE_S)
    release.set()
    await holding
    assert await asyncio.wait_for(asyncio.gather(*grouped), 5) == [2, 2]


async def test_a_failed_relaxed_write_leaves_the_connection_at_full(db: database.Database) -> None:
    def broken(db: sqlite3.Connection) -> None:
        raise sqlite3.IntegrityError("this write always fails")

    with pytest.raises(errors.StorageError, match="this write always fails"):
        await db.write(stored_values, sqlite=broken, durable=False)
    assert await db.write(synchronous_sqlalchemy, sqlite=synchronous_now) == 2


async def test_a_database_set_to_normal_is_left_at_normal(tmp_path: pathlib.Path) -> None:
    settings = database.DatabaseSettings(
        url=f"sqlite:///{tmp_path / 'n.db'}", sqlite_synchronous="NORMAL"
    )
    opened = database.Database(settings)
    await opened.open()
    try:
        assert await opened.write(synchronous_sqlalchemy, sqlite=synchronous_now) == 1
        assert (
            await opened.write(synchronous_sqlalchemy, sqlite=synchronous_now, durable=False) == 1
        )
    finally:
        await opened.close()
