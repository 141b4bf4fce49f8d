"""Migrations: they build exactly the declared schema, and upgrades keep existing rows."""

from __future__ import annotations

import pathlib

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from relay_server import crypto, models
from relay_server.store import database, sql, tables


def test_the_migrations_build_exactly_the_declared_schema(tmp_path: pathlib.Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    with engine.begin() as conn:
        command.upgrade(database.migration_config(conn), "head")
        drift = compare_metadata(MigrationContext.configure(conn), tables.metadata)
    engine.dispose()
    assert drift == [], "tables.py and the migrations disagree: add a migration"


async def test_an_upgrade_gives_existing_buckets_the_default_policy(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "relay.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(database.migration_config(conn), "0001")
        conn.execute(sa.text("INSERT INTO accounts VALUES ('a1', 'default', 1)"))
        conn.execute(
            sa.text("INSERT INTO buckets VALUES ('b1', 'a1', 'old', 9, 3600000, 86400000, 1)")
        )
        conn.execute(sa.text("INSERT INTO outputs VALUES ('o1', 'b1', 'default', 'agent', 1)"))
        conn.execute(sa.text("INSERT INTO inputs VALUES ('i1', 'b1', 'main', NULL, 1)"))
    engine.dispose()
    store = sql.SqlStore(
        database.DatabaseSettings(url=f"sqlite:///{path}"),
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
