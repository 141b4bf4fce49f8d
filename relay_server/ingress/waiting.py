"""Callers held until an agent relays their destination's answer (response mode "wait").

The webhook handler registers its event id before the event is committed, so that the
session pushing the event can see a caller waits and ask the agent for a Reply; the
session hands the answer over when the Reply arrives. An Ack without a Reply (an exec or
dir destination, an SDK worker) answers 200 with an empty body.

The registry lives in this process. With several replicas on PostgreSQL, an agent on
another replica relays the answer through the database (dispatch/wait_relay.py), and
`deliver` is then called by the relay instead of a session. It is bounded: beyond
`max_waiters` callers, or once the server is shutting down, a caller is not held and
gets the timeout answer at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import structlog

from relay_server import models
from relay_server.ingress import answers

log = structlog.get_logger(__name__)

DEFAULT_MAX_WAITERS = 1000
Waiter = asyncio.Future[answers.Answer | None]  # None: give the timeout answer now


class Waiting:
    def __init__(self, max_waiters: int = DEFAULT_MAX_WAITERS) -> None:
        self.max_waiters = max_waiters
        self._waiters: dict[str, Waiter] = {}
        self._closed = False

    @property
    def count(self) -> int:
        """Callers held right now."""
        return len(self._waiters)

    @contextlib.contextmanager
    def expect(self, event_id: str, mode: models.ResponseMode) -> Iterator[Waiter | None]:
        """Hold a place for the event's answer while the block runs (wait mode only).

        Yields None when the input does not wait, or when no caller may be held now.
        """
        if mode.kind is not models.ResponseKind.WAIT:
            yield None
            return
        if self._closed or len(self._waiters) >= self.max_waiters:
            log.warning("waiting_refused", waiting=len(self._waiters), closed=self._closed)
            yield None
            return
        waiter: Waiter = asyncio.get_running_loop().create_future()
        self._waiters[event_id] = waiter
        try:
            yield waiter
        finally:
            del self._waiters[event_id]
            waiter.cancel()

    def held_ids(self) -> list[str]:
        """The events whose callers are held here now."""
        return [event_id for event_id, waiter in self._waiters.items() if not waiter.done()]

    def wanted(self, event_id: str) -> bool:
        """Is a caller waiting for this event's answer (in this process)?"""
        return event_id in self._waiters

    def deliver(self, event_id: str, answer: answers.Answer) -> bool:
        """Hand the answer to the event's caller; False if none waits (any more)."""
        waiter = self._waiters.get(event_id)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(answer)
        return True

    def close(self) -> None:
        """Shutting down: every caller gets its timeout answer now, new ones at once."""
        self._closed = True
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)
