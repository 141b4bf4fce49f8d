"""Wakes the sessions that consume an output when it has new work (in this process).

Sessions also poll on a bounded interval, so work the hub never hears of (retries coming
due, replays from the CLI, a notification from another replica that was lost) is found
anyway. On PostgreSQL, other replicas' ingests reach the hub through
relay_server.dispatch.pg_notify.

The hub also carries the callers waiting for their destination's answer (`waiting`):
the other meeting point of ingress and sessions in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from relay_server.ingress import waiting as waiting_mod


class Hub:
    def __init__(self, waiting: waiting_mod.Waiting | None = None) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.waiting = waiting if waiting is not None else waiting_mod.Waiting()

    def register(self, output_ids: Iterable[str], wake: asyncio.Event) -> None:
        for output_id in output_ids:
            self._waiters.setdefault(output_id, set()).add(wake)

    def unregister(self, output_ids: Iterable[str], wake: asyncio.Event) -> None:
        for output_id in output_ids:
            waiting = self._waiters.get(output_id)
            if waiting is not None:
                waiting.discard(wake)
                if not waiting:
                    del self._waiters[output_id]

    def notify(self, output_ids: Iterable[str]) -> None:
        for output_id in output_ids:
            for wake in self._waiters.get(output_id, ()):
                wake.set()

    def notify_all(self) -> None:
        """Wake every session: news may have been missed (a listener was down)."""
        self.notify(list(self._waiters))
