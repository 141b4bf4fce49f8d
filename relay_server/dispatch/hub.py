"""Wakes the sessions that consume an output when it has new work (in this process).

Sessions also poll on a bounded interval, so work the hub never hears of (retries coming
due, replays from the CLI, a notification from another replica that was lost) is found
anyway. On PostgreSQL, other replicas' ingests reach the hub through
relay_server.dispatch.pg_notify.

The hub also carries the callers waiting for their destination's answer (`waiting`):
the other meeting point of ingress and sessions in this process; with replicas, `replies`
relays answers for callers another replica holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from relay_server import models
from relay_server.ingress import waiting as waiting_mod

if TYPE_CHECKING:
    from relay_server.dispatch import wait_relay


Member = tuple[Callable[[], bool], models.Offer | None]  # a session: ready(), offer


class Hub:
    def __init__(self, waiting: waiting_mod.Waiting | None = None) -> None:
        # Output id -> its sessions' wake-up events, each with "has it credit left?", in
        # the order they will be woken (round robin: a woken session moves to the end).
        self._waiters: dict[str, dict[asyncio.Event, Member]] = {}
        self.waiting = waiting if waiting is not None else waiting_mod.Waiting()
        # Replicas on PostgreSQL: answers for callers held by another replica (or None).
        self.replies: wait_relay.ReplyRelay | None = None
        # Output sets a poll just found idle, and when (monotonic): with many sessions on
        # the same buckets, one look per half poll interval answers for all of them.
        self._idle_since: dict[tuple[str, ...], float] = {}

    def recently_idle(self, output_ids: Sequence[str], within_s: float) -> bool:
        """Did a poll of these outputs find nothing to lease in the last `within_s`?"""
        since = self._idle_since.get(tuple(sorted(output_ids)))
        return since is not None and time.monotonic() - since < within_s

    def found_idle(self, output_ids: Sequence[str]) -> None:
        key = tuple(sorted(output_ids))
        if len(self._idle_since) > 10_000:  # bounded: forget stale marks wholesale
            self._idle_since.clear()
        self._idle_since[key] = time.monotonic()

    def register(
        self,
        output_ids: Iterable[str],
        wake: asyncio.Event,
        ready: Callable[[], bool] = lambda: True,
        offer: models.Offer | None = None,
    ) -> None:
        """A session on these outputs: `wake` it for news when `ready()` (it has credit);
        `offer` holds a place in its window for a new event (see `offer` below)."""
        for output_id in output_ids:
            self._waiters.setdefault(output_id, {})[wake] = (ready, offer)

    def unregister(self, output_ids: Iterable[str], wake: asyncio.Event) -> None:
        for output_id in output_ids:
            sessions = self._waiters.get(output_id)
            if sessions is not None:
                sessions.pop(wake, None)
                if not sessions:
                    del self._waiters[output_id]

    def notify(self, output_ids: Iterable[str], *, every: bool = False) -> None:
        """One new event for each of these outputs: wake one of its sessions.

        The next session in turn that has credit and is not already woken, so a burst is
        spread over a bucket's agents and a thousand sessions are not all sent to claim
        one event. With `every`, wake them all (news of unknown size: another replica's
        commit, a listener that was down). When none has credit (or all are woken
        already), all are told: the news waits for a session's next claim.
        """
        output_ids = list(output_ids)
        if self._idle_since:
            touched = set(output_ids)
            for key in [k for k in self._idle_since if touched.intersection(k)]:
                del self._idle_since[key]
        for output_id in output_ids:
            sessions = self._waiters.get(output_id)
            if not sessions:
                continue
            if every:
                for wake in sessions:
                    wake.set()
                continue
            for wake, (ready, _) in sessions.items():
                if not wake.is_set() and ready():
                    wake.set()
                    sessions[wake] = sessions.pop(wake)  # to the end of the line
                    break
            else:  # none free: each claims when its credit comes back
                for wake in sessions:
                    wake.set()

    def offer(self, output_id: str) -> models.Slot | None:
        """A place for one new event of `output_id` in the window of the next session in
        turn that has one free and is caught up (its last claim found no backlog, so the
        new event is the oldest it could be given). Ingest writes the delivery LEASED to
        it and gives it the lease after the commit: no claim, no re-read."""
        sessions = self._waiters.get(output_id)
        if not sessions:
            return None
        for wake, (_, offer) in sessions.items():
            slot = offer(output_id) if offer is not None else None
            if slot is not None:
                sessions[wake] = sessions.pop(wake)  # to the end of the line
                return slot
        return None

    def notify_all(self) -> None:
        """Wake every session: news may have been missed (a listener was down)."""
        self.notify(list(self._waiters), every=True)
