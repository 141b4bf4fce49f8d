"""A short-lived cache of input lookups, so a burst to one input costs one query."""

from __future__ import annotations

import time

from relay_server import ids, models
from relay_server.store import sql

MAX_ENTRIES = 10_000


class RouteCache:
    def __init__(self, store: sql.SqlStore, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, models.Route | None]] = {}

    async def get(self, input_id: str) -> models.Route | None:
        """The input's route, or None for an unknown (or malformed) input id."""
        if not ids.is_uuid(input_id):
            return None
        now = time.monotonic()
        cached = self._entries.get(input_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        route = await self._store.route(input_id)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[input_id] = (now + self._ttl_s, route)
        return route
