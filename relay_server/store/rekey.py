"""Sealed records after a key rotation: count them per key, re-encrypt them under the primary.

Every sealed column is listed in `SEALED` with the associated data its rows use (a test
checks that no binary column of the schema is missing). Re-encryption walks each table in
id order, `batch_size` rows (and at most `BATCH_BYTES`) at a time: it reads the rows,
opens and re-seals them outside any transaction, then writes each batch in its own short
transaction, so a running server's ingest waits at most one batch. A row is only updated
if its sealed values are still the ones read (an admin may have replaced an input's
secrets meanwhile). Only records not yet under the primary key are touched, so an
interrupted run is finished by running it again. An event whose body is a file (SQLite,
large bodies) has the file re-encrypted first (a new file renamed over it), then its row.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import crypto, errors
from relay_server.store import bodyfiles, codecs, database, queue, sql, tables, wait_replies

DEFAULT_BATCH_SIZE = 200
BATCH_BYTES = 16 * 1024 * 1024  # sealed bytes read into memory per batch, at most
MAX_FAILURES_KEPT = 100


@dataclass(frozen=True, slots=True)
class SealedColumn:
    table: sa.Table
    column: str
    aad: Callable[[str], bytes]  # row id -> associated data
    key: str = "id"  # the table's primary key column

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column}"

    @property
    def row_id(self) -> sa.Column[Any]:
        return self.table.c[self.key]


SEALED = (
    SealedColumn(tables.events, "query_sealed", lambda row_id: queue.aad(row_id, "query")),
    SealedColumn(tables.events, "headers_sealed", lambda row_id: queue.aad(row_id, "headers")),
    SealedColumn(tables.events, "body_sealed", lambda row_id: queue.aad(row_id, "body")),
    SealedColumn(tables.inputs, "verify_secrets_sealed", codecs.secrets_aad),
    # Answers wait here for seconds only, but a key may be retired while one does.
    SealedColumn(tables.wait_replies, "answer_sealed", wait_replies.aad, key="event_id"),
)


@dataclass(slots=True)
class RekeyReport:
    total: int  # records not under the primary when the run started
    done: int = 0  # records re-encrypted
    failures: list[tuple[str, str]] = field(default_factory=list)  # (column:row id, why)
    failed: int = 0

    @property
    def remaining(self) -> int:
        return max(self.total - self.done, 0)


Progress = Callable[[RekeyReport], None]


def _blob(expr: Any) -> Any:
    return sa.type_coerce(expr, sa.LargeBinary)


def _not_under(col: SealedColumn, primary_id: str) -> Any:
    prefix = crypto.record_prefix(primary_id)
    c = col.table.c[col.column]
    head = _blob(sa.func.substr(c, 1, len(prefix)))
    return sa.and_(c.is_not(None), head != sa.literal(prefix, sa.LargeBinary))


async def count_by_key(conn: AsyncConnection) -> dict[str, dict[str, int]]:
    """Key id -> {column name -> records sealed with it}, for every key id found in the rows."""
    found: dict[str, dict[str, int]] = {}
    for col in SEALED:
        c = col.table.c[col.column]
        length_byte = _blob(sa.func.substr(c, 2, 1))
        lengths = await conn.execute(
            sa.select(length_byte).where(c.is_not(None)).group_by(length_byte)
        )
        for (raw,) in lengths.all():
            size = bytes(raw)[0] if raw else 0
            key_id = _blob(sa.func.substr(c, 3, size))
            rows = await conn.execute(
                sa.select(key_id, sa.func.count())
                .where(c.is_not(None), length_byte == sa.literal(bytes(raw), sa.LargeBinary))
                .group_by(key_id)
            )
            for kid, n in rows.all():
                name = bytes(kid).decode("ascii", "replace")
                found.setdefault(name, {})[col.name] = int(n)
    return found


async def count_not_under(conn: AsyncConnection, primary_id: str) -> int:
    total = 0
    for col in SEALED:
        where = _not_under(col, primary_id)
        total += int(
            await conn.scalar(sa.select(sa.func.count()).select_from(col.table).where(where)) or 0
        )
    return total


def _by_table() -> dict[str, list[SealedColumn]]:
    grouped: dict[str, list[SealedColumn]] = {}
    for col in SEALED:
        grouped.setdefault(col.table.name, []).append(col)
    return grouped


async def reencrypt(
    store: sql.SqlStore, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: Progress | None = None
) -> RekeyReport:
    """Re-seal every record not under the store's primary key; returns what happened."""
    keyring = store.keyring
    async with store.db.read() as conn:
        report = RekeyReport(total=await count_not_under(conn, keyring.primary_id))
    for columns in _by_table().values():
        after = ""
        while True:
            async with store.db.read() as conn:
                ids = await _next_ids(conn, columns, keyring.primary_id, after, batch_size)
            if not ids:
                break
            after = ids[-1][0]
            # each chunk reads at most BATCH_BYTES (one big row alone)
            for chunk in database.split_by_size(ids, lambda item: item[1], BATCH_BYTES):
                chunk_ids = [row_id for row_id, _ in chunk]
                await _reencrypt_rows(store, keyring, columns, chunk_ids, report)
                if progress is not None:
                    progress(report)
    return report


async def _next_ids(
    conn: AsyncConnection,
    columns: Sequence[SealedColumn],
    primary_id: str,
    after: str,
    limit: int,
) -> list[tuple[str, int]]:
    """(row id, sealed bytes) of the next rows holding a record not under the primary."""
    table, row_id = columns[0].table, columns[0].row_id
    size = sum(
        (sa.func.coalesce(sa.func.length(table.c[col.column]), 0) for col in columns),
        start=sa.literal(0),
    )
    query = (
        sa.select(row_id, size)
        .where(row_id > after, sa.or_(*(_not_under(col, primary_id) for col in columns)))
        .order_by(row_id)
        .limit(limit)
    )
    return [(str(row_id), int(n)) for row_id, n in (await conn.execute(query)).all()]


async def _reencrypt_rows(
    store: sql.SqlStore,
    keyring: crypto.KeyRing,
    columns: Sequence[SealedColumn],
    row_ids: list[str],
    report: RekeyReport,
) -> None:
    table, row_id = columns[0].table, columns[0].row_id
    files = [table.c.body_file] if table is tables.events else []
    async with store.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    row_id.label("id"), *(table.c[col.column] for col in columns), *files
                ).where(row_id.in_(row_ids))
            )
        ).all()
    changes = []
    for row in rows:
        if files and row.body_file and not await _reseal_file(store, keyring, row.id, report):
            continue  # the row stays under its old key, so the key stays in use
        if change := _reseal(keyring, columns, row, report):
            changes.append(change)
    report.done += await store.db.write(
        functools.partial(_apply, table=table, row_id=row_id, changes=changes)
    )


Change = tuple[str, dict[str, bytes], dict[str, bytes]]  # row id, new values, old values


async def _reseal_file(
    store: sql.SqlStore, keyring: crypto.KeyRing, event_id: str, report: RekeyReport
) -> bool:
    """Re-encrypt an event's body file (SQLite, large bodies) before its row: the row's
    records decide which keys are in use, so they move to the primary only after the file."""
    aad = queue.aad(event_id, "body")
    try:
        await asyncio.to_thread(bodyfiles.reseal, store.bodies, keyring, event_id, aad)
    except (errors.CryptoError, errors.StorageError, OSError) as exc:
        report.failed += 1
        if len(report.failures) < MAX_FAILURES_KEPT:
            why = exc.message if isinstance(exc, errors.RelayError) else str(exc)
            report.failures.append((f"events.body file:{event_id}", why))
        return False
    return True


def _reseal(
    keyring: crypto.KeyRing, columns: Sequence[SealedColumn], row: Any, report: RekeyReport
) -> Change | None:
    new: dict[str, bytes] = {}
    old: dict[str, bytes] = {}
    for col in columns:
        record = getattr(row, col.column)
        if record is None or keyring.is_sealed_with_primary(record):
            continue
        try:
            plaintext = keyring.open(record, col.aad(row.id))
        except errors.CryptoError as exc:
            report.failed += 1
            if len(report.failures) < MAX_FAILURES_KEPT:
                report.failures.append((f"{col.name}:{row.id}", exc.message))
            continue
        new[col.column] = keyring.seal(plaintext, col.aad(row.id))
        old[col.column] = record
    return (row.id, new, old) if new else None


async def _apply(
    conn: AsyncConnection, table: sa.Table, row_id: sa.Column[Any], changes: list[Change]
) -> int:
    done = 0
    for changed_id, new, old in changes:
        unchanged = [table.c[name] == value for name, value in old.items()]
        result = await conn.execute(
            table.update().where(row_id == changed_id, *unchanged).values(**new)
        )
        done += len(new) if result.rowcount == 1 else 0
    return done
