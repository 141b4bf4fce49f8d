"""A short-lived cache of input lookups, so a burst to one input costs one query.

Concurrent misses for one input share a single lookup: when an entry expires under load,
every request in flight would otherwise query the database at once (and hold a pooled
connection each) for the same row.
"""

from __future__ import annotations

import asyncio
import time

from relay_server import ids, models
from relay_server.store import sql

MAX_ENTRIES = 10_000

Lookup = asyncio.Task[models.Route | None]


class RouteCache:
    def __init__(self, store: sql.SqlStore, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, models.Route | None]] = {}
        self._lookups: dict[str, Lookup] = {}  # misses being looked up now

    async def get(self, input_id: str) -> models.Route | None:
        """The input's route, or None for an unknown (or malformed) input id."""
        cached = self._entries.get(input_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        if not ids.is_uuid(input_id):
            return None
        lookup = self._lookups.get(input_id)
        if lookup is None or lookup.done():
            lookup = asyncio.create_task(self._lookup(input_id), name="route-lookup")
            self._lookups[input_id] = lookup
            lookup.add_done_callback(lambda done: self._finished(input_id, done))
        # Shielded: a caller that goes away does not cancel the others' lookup.
        return await asyncio.shield(lookup)

    async def _lookup(self, input_id: str) -> models.Route | None:
        started = time.monotonic()  # the entry is as old as the query, not its answer
        route = await self._store.route(input_id)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[input_id] = (started + self._ttl_s, route)
        return route

    def _finished(self, input_id: str, lookup: Lookup) -> None:
        if self._lookups.get(input_id) is lookup:
            del self._lookups[input_id]
        if not lookup.cancelled():
            lookup.exception()  # seen: its callers may all have gone (they got it otherwise)
