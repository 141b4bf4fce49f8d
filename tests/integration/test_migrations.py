"""Migrations: they build exactly the declared schema, and upgrades keep existing rows.

Both engines: an empty SQLite file and an empty PostgreSQL database (not the migrated
template the other integration tests clone).
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from relay_server import crypto, models
from relay_server.store import database, sql, tables
from tests import pg


@pytest.fixture
async def empty_url(engine: str, tmp_path: pathlib.Path) -> AsyncIterator[str]:
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path / 'relay.db'}"
        return
    async with pg.fresh_database("stowhook_migrations") as url:
        yield url


T = TypeVar("T")


async def run_sync_on(url: str, fn: Callable[[sa.Connection], T]) -> T:
    """Run `fn(sync_connection)` in one transaction on `url` (any engine)."""
    engine = create_async_engine(database.DatabaseSettings(url=url).async_url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


async def test_the_migrations_build_exactly_the_declared_schema(empty_url: str) -> None:
    def upgrade_and_compare(conn: sa.Connection) -> list[object]:
        command.upgrade(database.migration_config(conn), "head")
        return list(compare_metadata(MigrationContext.configure(conn), tables.metadata))

    drift = await run_sync_on(empty_url, upgrade_and_compare)
    assert drift == [], "tables.py and the migrations disagree: add a migration"


async def test_an_upgrade_gives_existing_buckets_the_default_policy(empty_url: str) -> None:
    def upgrade_to_0001_with_rows(conn: sa.Connection) -> None:
        command.upgrade(database.migration_config(conn), "0001")
        conn.execute(sa.text("INSERT INTO accounts VALUES ('a1', 'default', 1)"))
        conn.execute(
            sa.text("INSERT INTO buckets VALUES ('b1', 'a1', 'old', 9, 3600000, 86400000, 1)")
        )
        conn.execute(sa.text("INSERT INTO outputs VALUES ('o1', 'b1', 'default', 'agent', 1)"))
        conn.execute(sa.text("INSERT INTO inputs VALUES ('i1', 'b1', 'main', NULL, 1)"))

    await run_sync_on(empty_url, upgrade_to_0001_with_rows)
    store = sql.SqlStore(
        database.DatabaseSettings(url=empty_url),
        crypto.parse_key_file(crypto.generate_key_line()),
    )
    await store.migrate()
    await store.open()
    try:
        bucket = await store.get_bucket("a1", "old")
        (output,) = await store.list_outputs(bucket)
        route = await store.route("i1")
    finally:
        await store.close()
    assert bucket.policy == models.BucketPolicy(
        max_attempts=9, max_age_ms=3_600_000, retention_ms=86_400_000
    ), "kept its own retry and retention; dedup and DLQ retention get the defaults"
    assert (output.name, output.ordered) == ("default", False), "outputs survive the upgrade"
    assert route is not None and route.output_ids == ("o1",), "so do inputs"


def test_schema_head_names_the_newest_migration() -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(database.MIGRATIONS))
    assert scripts.get_current_head() == database.SCHEMA_HEAD, (
        "a new migration must also move database.SCHEMA_HEAD, or CLI commands skip it"
    )
