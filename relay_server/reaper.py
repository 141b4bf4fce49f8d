"""Housekeeping on timers: expired leases back to the queue; retention.

An expired lease counts as a failed attempt, so a poison event that kills its agent
ends in the dead-letter queue instead of looping forever. The retention cleaner deletes
what the buckets' retention rules say may go (relay_server.store.retention).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from relay_server import errors
from relay_server.store import retention, sql

log = structlog.get_logger(__name__)


class Periodic:
    """Runs `once()` now and then every `interval_s` until stopped."""

    def __init__(self, store: sql.SqlStore, interval_s: float) -> None:
        self._store = store
        self._interval_s = interval_s
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval_s)

    async def once(self) -> int:
        raise NotImplementedError


class LeaseReaper(Periodic):
    async def once(self) -> int:
        try:
            expired = await self._store.reap()
        except errors.StorageError as exc:
            log.warning("reap_failed", error=str(exc))
            return 0
        for lease_id in expired:
            log.info("lease_expired", lease_id=lease_id)
        return len(expired)


class RetentionCleaner(Periodic):
    def __init__(self, store: sql.SqlStore, interval_s: float) -> None:
        super().__init__(store, interval_s)
        # Where the walks through old events stopped (the next pass resumes there instead
        # of walking again past events it must keep), and the pace that leaves the
        # database to ingest (see store/retention.py).
        self._sweep = retention.Sweep(busy_share=retention.CLEANER_BUSY_SHARE)

    def stop(self) -> None:
        self._sweep.stopping.set()  # a pass under way ends after its current batch
        super().stop()

    async def once(self) -> int:
        try:
            removed = await self._store.clean(sweep=self._sweep)
        except errors.StorageError as exc:
            log.warning("retention_failed", error=str(exc))
            return 0
        if any(removed.values()):
            log.info("retention_cleaned", **removed)
        return sum(removed.values())
