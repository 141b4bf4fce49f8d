"""Ephemeral buckets: payloads held in this server's memory, never in the database.

An event of an ephemeral bucket is stored like any other, so its deliveries follow the
same state machine and `event list`/`status` show them, except that its path, query,
headers, body and source never reach the database, not even sealed: the events row
holds sealed empty values, `ephemeral = true`, and the metadata (id, input, method,
size, time). The payload waits in `PayloadMemory` (bounded; when full, webhooks get
503 + Retry-After) until every delivery of the event is settled (delivered or dead).

The trade-off: a server restart loses the payloads of undelivered events. A lease whose
payload is not in memory sends its delivery straight to DEAD with `LOST_ERROR` instead
of handing the agent an empty event; a replay of an ephemeral event meets the same fate.
The memory belongs to one process: run ephemeral buckets on one server, not replicas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import crypto, errors, models
from relay_server.store import database, queue, tables

log = structlog.get_logger(__name__)

D = tables.deliveries
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
LOST_ERROR = (
    "ephemeral payload lost: server restarted (ephemeral payloads live only in the memory "
    "of the server that received them)"
)


class MemoryFull(errors.StorageUnavailable):
    """The memory for ephemeral payloads is full: try again once agents have caught up."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Payload:
    path: str
    query: str
    headers: models.Headers
    body: bytes

    @property
    def size(self) -> int:
        headers = sum(len(name) + len(value) for name, value in self.headers)
        return len(self.path) + len(self.query) + headers + len(self.body)


class PayloadMemory:
    """Payloads by event id, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._payloads: dict[str, Payload] = {}
        self._events_of: dict[str, str] = {}  # delivery id -> event id, once leased

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._payloads

    def hold(self, event_id: str, payload: Payload) -> None:
        if self.used_bytes + payload.size > self.max_bytes:
            log.warning("ephemeral_memory_full", used_bytes=self.used_bytes, size=payload.size)
            raise MemoryFull()
        self._payloads[event_id] = payload
        self.used_bytes += payload.size

    def take(self, event_id: str, delivery_id: str) -> Payload | None:
        """The event's payload for a lease of `delivery_id`; None if it is gone."""
        payload = self._payloads.get(event_id)
        if payload is not None:
            self._events_of[delivery_id] = event_id
        return payload

    def events_of(self, lease_ids: Iterable[str]) -> set[str]:
        """The events held here that these leases ("<delivery_id>.<attempt>") carry."""
        delivery_ids = (lease_id.rpartition(".")[0] for lease_id in lease_ids)
        return {self._events_of[d] for d in delivery_ids if d in self._events_of}

    def drop(self, event_ids: Iterable[str]) -> None:
        dropped = set(event_ids)
        for event_id in dropped:
            payload = self._payloads.pop(event_id, None)
            if payload is not None:
                self.used_bytes -= payload.size
        for delivery_id in [d for d, e in self._events_of.items() if e in dropped]:
            del self._events_of[delivery_id]


def held_row(
    keyring: crypto.KeyRing, memory: PayloadMemory, event: models.IncomingEvent
) -> dict[str, object]:
    """The events row for an ephemeral event; its payload goes to `memory` (MemoryFull)."""
    payload = Payload(path=event.path, query=event.query, headers=event.headers, body=event.body)
    memory.hold(event.id, payload)
    bare = dataclasses.replace(event, path="", query="", headers=(), body=b"", source="")
    return {**queue.seal_event(keyring, bare), "size": len(event.body), "ephemeral": True}


async def forget_settled(
    db: database.Database, memory: PayloadMemory, lease_ids: Sequence[str]
) -> None:
    """Drop the payloads of events whose deliveries (among those leased) are all settled."""
    held = memory.events_of(lease_ids)
    if not held:
        return
    try:
        async with db.read() as conn:
            active = await conn.scalars(
                sa.select(D.c.event_id)
                .where(D.c.event_id.in_(held), queue.row_state(*queue.ACTIVE_STATES))
                .distinct()
            )
            done = held - set(active)
    except errors.StorageError as exc:
        # The settlement is committed; the payload waits for the event's next settlement.
        log.warning("ephemeral_release_failed", error=str(exc))
        return
    memory.drop(done)


async def payloads_lost(
    conn: AsyncConnection, leases: Sequence[tuple[str, int]], reason: str = LOST_ERROR
) -> None:
    """Dead-letter just-claimed deliveries (id, attempt) whose payload is not in memory
    (or, with another `reason`, not anywhere: a body file gone missing).

    The same transition and attempt record as a Reject (queue.py), by "server".
    """
    lost = models.Settlement(lease_id="", outcome=models.Outcome.REJECT, reason=reason)
    for delivery_id, attempt in leases:
        dead = models.DeliveryState.DEAD
        started = await queue._finish(conn, delivery_id, attempt, dead, reason)
        if started is not None:
            log.warning("payload_lost", delivery_id=delivery_id, attempt=attempt, reason=reason)
            await queue._record_attempts(conn, [(delivery_id, attempt, started)], lost, "server")
