"""Throw-away PostgreSQL databases for tests.

Every test that runs on PostgreSQL gets a database of its own with a random name, made on
the server at TEST_POSTGRES_URL (default: the local server CI starts, trust auth) and
dropped afterwards, so tests never see each other's rows. Tests skip, saying why, only when
that server cannot be reached; anything else that goes wrong is a failure.

Cloning a database that is already migrated (`CREATE DATABASE x TEMPLATE y`) takes a few
milliseconds where running the migrations takes about a second: `migrated_template()`
migrates one template per test session and `create_database(template=...)` clones it.

    async with pg.fresh_database("store") as url:   # postgresql+asyncpg://.../store_1a2b...
        ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import socket
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest
import sqlalchemy as sa

T = TypeVar("T")

# The maintenance database of the server the tests use (CREATE/DROP DATABASE run there).
ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
_ADMIN = sa.engine.make_url(ADMIN_URL)
HOST = _ADMIN.host or "127.0.0.1"
PORT = _ADMIN.port or 5432
SKIP_REASON = f"PostgreSQL is not reachable on {HOST}:{PORT} (set TEST_POSTGRES_URL)"


@functools.cache
def pg_available() -> bool:
    """Whether the test server accepts TCP connections (checked once per process)."""
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            return True
    except OSError:
        return False


def require_pg() -> None:
    """Skip the calling test, saying why, when the PostgreSQL server is unreachable."""
    if not pg_available():
        pytest.skip(SKIP_REASON)


def url_for(name: str, driver: str = "postgresql+asyncpg") -> str:
    """The SQLAlchemy URL of database `name` on the test server."""
    return _ADMIN.set(drivername=driver, database=name).render_as_string(hide_password=False)


def database_name(url: str) -> str:
    name = sa.engine.make_url(url).database
    assert name, f"no database in {url!r}"
    return name


async def admin_execute(statement: str) -> None:
    conn = await asyncpg.connect(
        host=HOST,
        port=PORT,
        user=_ADMIN.username or "postgres",
        password=_ADMIN.password,
        database=_ADMIN.database or "postgres",
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(
    name_prefix: str = "stowhook_test", *, template: str | None = None
) -> str:
    """A new empty (or `template`-cloned) database; returns its postgresql+asyncpg URL."""
    require_pg()
    prefix = "".join(c if c.isalnum() else "_" for c in name_prefix.lower())[:40]
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f" TEMPLATE {_quote(template)}" if template else ""
    await admin_execute(f"CREATE DATABASE {_quote(name)}{clause}")
    return url_for(name)


async def drop_database(url_or_name: str) -> None:
    """Drop a database made by create_database, closing whatever is still connected to it."""
    name = database_name(url_or_name) if "/" in url_or_name else url_or_name
    await admin_execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")


@contextlib.asynccontextmanager
async def fresh_database(
    name_prefix: str = "stowhook_test", *, template: str | None = None
) -> AsyncIterator[str]:
    """A database for the duration of the block (dropped afterwards); yields its URL."""
    url = await create_database(name_prefix, template=template)
    try:
        yield url
    finally:
        await drop_database(url)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion from synchronous code, even inside a running event loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def fresh_database_sync(
    name_prefix: str = "stowhook_test", *, template: str | None = None
) -> Iterator[str]:
    """fresh_database for synchronous fixtures and tests."""
    url = run_sync(create_database(name_prefix, template=template))
    try:
        yield url
    finally:
        run_sync(drop_database(url))


class DatabaseSupply:
    """Clones of `template`, each made in a background thread while the previous one is used.

    CREATE DATABASE costs about 0.35 s (the server syncs the new files to disk); a test
    suite that takes one database per test would wait that long each time. `take()` hands
    out the clone made ahead and orders the next; `give_back()` drops a used one in the
    background. close() drops the spare and waits for every drop.
    """

    def __init__(self, name_prefix: str, template: str) -> None:
        self._prefix, self._template = name_prefix, template
        self._threads = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pg-supply")
        self._next: concurrent.futures.Future[str] | None = None
        self._drops: list[concurrent.futures.Future[None]] = []

    def _order(self) -> concurrent.futures.Future[str]:
        return self._threads.submit(
            asyncio.run, create_database(self._prefix, template=self._template)
        )

    def take(self) -> str:
        """A fresh clone's URL (postgresql+asyncpg://...)."""
        ready = self._next or self._order()
        self._next = self._order()
        return ready.result()

    def give_back(self, url: str) -> None:
        self._drops.append(self._threads.submit(asyncio.run, drop_database(url)))

    def close(self) -> None:
        if self._next is not None:
            with contextlib.suppress(Exception):  # the spare may have failed: nothing to drop
                self.give_back(self._next.result())
        for drop in self._drops:
            drop.result()
        self._threads.shutdown()


async def migrated_template(name_prefix: str = "stowhook_tpl") -> str:
    """A new database migrated to the newest schema, for create_database(template=...).

    The caller drops it (drop_database) when the session ends. The migration engine is
    disposed before returning: PostgreSQL refuses to clone a database someone is using.
    """
    from relay_server.store import database  # the store, not a copy of its migrations

    url = await create_database(name_prefix)
    db = database.Database(database.DatabaseSettings(url=url))
    try:
        await db.migrate()
    except BaseException:
        await db.close()
        await drop_database(url)
        raise
    await db.close()
    return database_name(url)
