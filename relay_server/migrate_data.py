"""Moving an installation to another database (SQLite -> PostgreSQL): copy, then verify.

Every table of the schema is copied row by row as it is stored: events stay sealed (their
bytes are copied, never opened, so no key is needed here; the new relay needs the same
key file). One change is made on the way: a delivery that was leased by an agent of the
old relay goes back to PENDING with its lease cleared, so the new relay hands it out again.

The copy is resumable: rows go over in primary-key order, in batches that each commit, and
a row whose primary key the target holds already is skipped (`ON CONFLICT DO NOTHING`).
A body that the source keeps in a file (SQLite, 1 MiB or more; store/bodyfiles.py) goes
into its row, sealed as it is. Integer ids (attempts, audit_log) are kept; PostgreSQL's
sequences are moved past them afterwards. The source is read inside one transaction: a
consistent snapshot even if its relay were still writing (it should be stopped: what it
takes after the snapshot stays behind).

At the end every table is verified: each source row's primary key must be in the target.
The target may hold more (its own audit entries, events a new relay took since); it may
not hold accounts the source does not know, unless forced: that would be another
installation's data.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import errors, models
from relay_server.store import bodyfiles, database, tables

log = structlog.get_logger(__name__)

DEFAULT_BATCH_ROWS = 500
MAX_PARAMETERS = 30_000  # per INSERT: PostgreSQL allows 32,767, SQLite 32,766
BODY_FILE_BYTES = 64 * 1024 * 1024  # bodies read from files (SQLite) per INSERT, at most

Progress = Callable[[str, int, int], None]  # table, rows done, rows in all


@dataclass(frozen=True, slots=True, kw_only=True)
class TableCount:
    table: str
    source: int  # rows in the source
    present: int  # source rows whose primary key the target holds
    target: int  # rows in the target (its own rows too)
    copied: int  # rows this run inserted

    @property
    def ok(self) -> bool:
        return self.present == self.source


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    tables: list[TableCount]

    @property
    def ok(self) -> bool:
        return all(count.ok for count in self.tables)

    @property
    def copied(self) -> int:
        return sum(count.copied for count in self.tables)


def check_urls(source_url: str, target_url: str) -> None:
    """Refuse a copy onto itself or from a SQLite file that does not exist."""
    source, target = sa.engine.make_url(source_url), sa.engine.make_url(target_url)
    if source.set(drivername=source.get_backend_name()) == target.set(
        drivername=target.get_backend_name()
    ):
        raise errors.ConfigError("--from and --to name the same database")
    if source.get_backend_name() == "sqlite":
        if not source.database or source.database == ":memory:":
            raise errors.ConfigError("--from must name a SQLite file: sqlite:///path/to.db")
        if not pathlib.Path(source.database).is_file():
            raise errors.ConfigError(f"--from: no SQLite database at {source.database}")


async def migrate_data(
    source: database.Database,
    target: database.Database,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    force: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    """Copy every table from `source` into `target` (both migrated), then verify."""
    if batch_rows < 1:
        raise errors.ConfigError("the batch size must be at least 1")
    async with source.read() as src:
        await _check_target(src, target, force=force)
        copied = {}
        for table in tables.metadata.sorted_tables:
            copied[table.name] = await _copy_table(
                src, target, table, batch_rows, progress, source.bodies
            )
        if target.dialect == "postgresql":
            await target.write(_reset_sequences)
        counts = [
            await _verify(src, target, table, copied[table.name], batch_rows)
            for table in tables.metadata.sorted_tables
        ]
    outcome = Outcome(tables=counts)
    log.info("data_migrated", rows_copied=outcome.copied, verified=outcome.ok)
    return outcome


async def _check_target(src: AsyncConnection, target: database.Database, *, force: bool) -> None:
    accounts = tables.accounts
    async with target.read() as dst:
        theirs = dict((await dst.execute(sa.select(accounts.c.id, accounts.c.name))).all())
    ours = set((await src.execute(sa.select(accounts.c.id))).scalars())
    foreign = sorted(name for account_id, name in theirs.items() if account_id not in ours)
    if foreign and not force:
        raise errors.Conflict(
            f"the target database holds {len(foreign)} account(s) the source does not have "
            f"({', '.join(foreign[:5])}): it belongs to another installation. Copy into an "
            "empty database, or pass --force to merge into this one"
        )


async def _copy_table(
    src: AsyncConnection,
    target: database.Database,
    table: sa.Table,
    batch_rows: int,
    progress: Progress | None,
    bodies: bodyfiles.BodyFiles | None,
) -> int:
    """Copy the rows of `table` the target lacks; returns how many were inserted."""
    total = await _count(src, table)
    key = list(table.primary_key.columns)
    per_batch = max(1, min(batch_rows, MAX_PARAMETERS // len(table.columns)))
    done = copied = 0
    last: Sequence[Any] | None = None
    if progress is not None:
        progress(table.name, 0, total)
    while True:
        query = sa.select(table).order_by(*key).limit(per_batch)
        if last is not None:
            query = query.where(_after(key, last))
        rows = [dict(row._mapping) for row in await src.execute(query)]
        if not rows:
            return copied
        last = [rows[-1][column.name] for column in key]
        values = [_for_new_relay(table, row) for row in rows]
        if table is tables.events and bodies is not None:
            # at most BODY_FILE_BYTES of bodies read from files per INSERT
            for part in database.split_by_size(values, _file_bytes, BODY_FILE_BYTES):
                part = await _bodies_inline(bodies, part)
                copied += await target.write(_inserter(table, part))
        else:
            copied += await target.write(_inserter(table, values))
        done += len(rows)
        if progress is not None:
            progress(table.name, done, total)


def _after(key: list[sa.Column[Any]], last: Sequence[Any]) -> sa.ColumnElement[bool]:
    if len(key) == 1:
        return key[0] > sa.literal(last[0], key[0].type)
    return sa.tuple_(*key) > sa.tuple_(
        *(sa.literal(v, c.type) for c, v in zip(key, last, strict=True))
    )


def _for_new_relay(table: sa.Table, row: dict[str, Any]) -> dict[str, Any]:
    """The row as the new relay should see it: a lease of the old relay is given back."""
    if table is tables.deliveries and row["state"] == models.DeliveryState.LEASED:
        return {
            **row,
            "state": models.DeliveryState.PENDING,
            "leased_at": None,
            "lease_expires_at": None,
            "leased_by": None,
        }
    return row


def _file_bytes(row: dict[str, Any]) -> int:
    return int(row["size"]) if row["body_file"] else 0


async def _bodies_inline(
    files: bodyfiles.BodyFiles, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Events rows with each body that is a file (SQLite) read into the row: the sealed
    record is the same either way, and the target may be on another machine."""
    inline = []
    for row in rows:
        if row["body_file"]:
            sealed = await asyncio.to_thread(files.read, row["id"])
            row = {**row, "body_sealed": sealed, "body_file": False}
        inline.append(row)
    return inline


def _inserter(table: sa.Table, values: list[dict[str, Any]]) -> Callable[[AsyncConnection], Any]:
    async def insert(conn: AsyncConnection) -> int:
        make = sqlite_insert if conn.dialect.name == "sqlite" else postgresql_insert
        key = list(table.primary_key.columns)
        statement = (
            make(table).values(values).on_conflict_do_nothing(index_elements=key).returning(*key)
        )
        return len((await conn.execute(statement)).all())

    return insert


async def _reset_sequences(conn: AsyncConnection) -> None:
    """Move each serial id's sequence past the largest id copied (PostgreSQL)."""
    for table in tables.metadata.sorted_tables:
        column = table.c.get("id")
        if column is None or not isinstance(column.type, sa.Integer) or not column.primary_key:
            continue
        await conn.execute(
            sa.text(
                f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                f"(SELECT COALESCE(MAX(id), 0) + 1 FROM {table.name}), false)"
            )
        )


async def _verify(
    src: AsyncConnection,
    target: database.Database,
    table: sa.Table,
    copied: int,
    batch_rows: int,
) -> TableCount:
    """Count the source rows whose primary key is in the target."""
    key = list(table.primary_key.columns)
    source_rows = present = 0
    last: Sequence[Any] | None = None
    async with target.read() as dst:
        while True:
            query = sa.select(*key).order_by(*key).limit(max(batch_rows, 1000))
            if last is not None:
                query = query.where(_after(key, last))
            keys = [tuple(row) for row in await src.execute(query)]
            if not keys:
                break
            last = keys[-1]
            source_rows += len(keys)
            found = sa.select(sa.func.count()).select_from(table)
            if len(key) == 1:
                found = found.where(key[0].in_([k[0] for k in keys]))
            else:
                found = found.where(sa.tuple_(*key).in_(keys))
            present += int((await dst.execute(found)).scalar_one())
        target_rows = await _count(dst, table)
    return TableCount(
        table=table.name,
        source=source_rows,
        present=present,
        target=target_rows,
        copied=copied,
    )


async def _count(conn: AsyncConnection, table: sa.Table) -> int:
    return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())
