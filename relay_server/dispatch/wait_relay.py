"""Wait mode across replicas: a caller held on one replica, its agent on another.

The replica holding the caller marks the event (`caller_waits_until`), so whichever
replica leases it asks its agent for a Reply. If that replica does not hold the caller,
`send` leaves the answer in the database (store/wait_replies.py, sealed) with a
`pg_notify`; the caller's replica takes it when its listener hears the event id (`heard`)
or, should that notification be lost, at its next look: every `interval_s` while any
caller waits. Only used on PostgreSQL; on SQLite one process holds callers and agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import structlog

from relay_server import errors, models, reaper
from relay_server.ingress import answers, waiting
from relay_server.store import sql

log = structlog.get_logger(__name__)

LOOK_INTERVAL_S = 0.5  # how often held callers look for an answer a lost notice announced


def encode(answer: answers.Answer) -> bytes:
    """The answer as bytes to seal: a JSON line (status, headers), then the body."""
    head = {"status": answer.status, "headers": [list(header) for header in answer.headers]}
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + answer.body


def decode(plain: bytes) -> answers.Answer:
    """The answer `encode` made, checked again as a Reply would be."""
    head, _, body = plain.partition(b"\n")
    fields = json.loads(head)
    headers = [(str(name), str(value)) for name, value in fields["headers"]]
    return answers.from_reply(int(fields["status"]), headers, body, too_large=False)


class ReplyRelay(reaper.Periodic):
    """Hands destination answers between replicas sharing one PostgreSQL database."""

    def __init__(
        self, store: sql.SqlStore, held: waiting.Waiting, interval_s: float = LOOK_INTERVAL_S
    ) -> None:
        super().__init__(store, interval_s)
        self._held = held
        self._heard = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()

    def wants(self, lease: models.Lease) -> bool:
        """Should the agent be asked for a Reply that a caller elsewhere may wait for?"""
        until = lease.caller_waits_until
        return until is not None and until > models.now_ms()

    def send(self, lease: models.Lease, answer: answers.Answer) -> None:
        """Leave `answer` for the replica holding the lease's caller (in the background)."""
        task = asyncio.create_task(self._send(lease, answer), name=f"reply-{lease.event_id}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, lease: models.Lease, answer: answers.Answer) -> None:
        expires_at = lease.caller_waits_until or models.now_ms()
        try:
            await self._store.put_wait_reply(lease.event_id, encode(answer), expires_at=expires_at)
        except errors.StorageError as exc:  # the caller gets its timeout answer
            log.warning("reply_not_relayed", event_id=lease.event_id, error=str(exc))
            return
        log.debug("reply_relayed", event_id=lease.event_id, status=answer.status)

    def heard(self, event_id: str) -> None:
        """A replica left an answer for `event_id` (a notification): look now if it is ours."""
        if self._held.wanted(event_id):
            self._heard.set()

    def look_now(self) -> None:
        """Look for answers at once (the listener reconnected: notices may have been lost)."""
        self._heard.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            self._heard.clear()
            await self.once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken(), self._interval_s)
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=5)

    async def _woken(self) -> None:
        stop = asyncio.create_task(self._stop.wait())
        heard = asyncio.create_task(self._heard.wait())
        try:
            await asyncio.wait({stop, heard}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            heard.cancel()

    async def once(self) -> int:
        event_ids = self._held.held_ids()
        if not event_ids:
            return 0
        try:
            found = await self._store.take_wait_replies(event_ids)
        except errors.StorageError as exc:
            log.warning("replies_not_taken", error=str(exc))
            return 0
        for event_id, plain in found.items():
            try:
                answer = decode(plain)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("reply_unusable", event_id=event_id, reason=str(exc))
                answer = answers.BAD_GATEWAY
            self._held.deliver(event_id, answer)
        return len(found)
