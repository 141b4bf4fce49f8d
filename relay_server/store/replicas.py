"""What replicas sharing one PostgreSQL database tell each other, inside transactions.

* New work: an ingest transaction ends with `pg_notify(CHANNEL, ...)` naming the outputs
  that got deliveries. PostgreSQL sends a notification only when its transaction commits,
  so no replica is ever woken for an event that then rolled back. The payload starts with
  this process's ORIGIN, so a replica's listener can skip its own (it already woke its
  sessions in process). A notification is only a hint: sessions also poll.
* Housekeeping: `exclusive(conn, job)` takes a transaction-scoped advisory lock
  (`pg_try_advisory_xact_lock`) so that when every replica runs the lease reaper or the
  retention cleaner at once, one does each batch and the others skip it without waiting.

On SQLite both are no-ops: one process owns the database.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

CHANNEL = "stowhook_events"
ORIGIN = secrets.token_hex(6)  # this process; notifications it sent carry it
MAX_PAYLOAD_BYTES = 7900  # PostgreSQL refuses payloads of 8000 bytes or more
SEPARATOR = ","


def _lock_key(job: str) -> int:
    """A stable signed 64-bit advisory lock key for `job`."""
    digest = hashlib.sha256(f"stowhook:{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def exclusive(conn: AsyncConnection, job: str) -> bool:
    """True if this transaction may do `job` now (no other replica is doing it).

    The lock is released when the transaction ends. SQLite: always True.
    """
    if conn.dialect.name != "postgresql":
        return True
    return bool(await conn.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(_lock_key(job)))))


def payloads(output_ids: Iterable[str]) -> Iterator[str]:
    """`ORIGIN:id,id,...` notification payloads, each under PostgreSQL's size limit."""
    head = f"{ORIGIN}:"
    chunk: list[str] = []
    size = len(head)
    for output_id in sorted(set(output_ids)):
        if chunk and size + len(output_id) + 1 > MAX_PAYLOAD_BYTES:
            yield head + SEPARATOR.join(chunk)
            chunk, size = [], len(head)
        chunk.append(output_id)
        size += len(output_id) + 1
    if chunk:
        yield head + SEPARATOR.join(chunk)


def parse(payload: str) -> tuple[str, list[str]]:
    """(origin, output ids) of a payload made by `payloads`."""
    origin, _, ids = payload.partition(":")
    return origin, [output_id for output_id in ids.split(SEPARATOR) if output_id]


async def publish(conn: AsyncConnection, output_ids: Iterable[str]) -> None:
    """Tell the other replicas, when this transaction commits, that these outputs have work."""
    if conn.dialect.name != "postgresql":
        return
    for payload in payloads(output_ids):
        await conn.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))
