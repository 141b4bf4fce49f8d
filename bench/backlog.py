"""Backlogs for the bench: many pending deliveries, fast, through the store's own ingest.

`preload` builds webhooks as the ingress would (an `IncomingEvent` on the input's real
route) and hands them to `SqlStore.ingest` a batch at a time: the store seals each one
(AES-256-GCM, like every real event) and its group commit turns a batch into one
transaction. Each carries `X-Bench-Id: <prefix>-<n>` and a body that starts with that id,
so the load generator's sink can account for it after the agent forwards it.

`lease_cost` times `SqlStore.lease` of one batch (what a session does for an agent with
credit) against whatever backlog the database holds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import time
from collections.abc import Callable

from bench import load
from relay_server import ids, models
from relay_server.store import sql

BATCH = 2_000  # events per ingest group (one transaction)
PRELOAD_LIMIT_S = 900.0


async def preload(
    store: sql.SqlStore,
    input_id: str,
    *,
    count: int,
    body_bytes: int = 1024,
    prefix: str = "pre",
    start: int = 0,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Ingest events `start` .. `start + count - 1` of `prefix` into the input's bucket."""
    route = await store.route(input_id)
    if route is None:
        raise RuntimeError(f"input {input_id} does not exist")
    deadline = time.monotonic() + PRELOAD_LIMIT_S
    for first in range(start, start + count, BATCH):
        if time.monotonic() > deadline:
            raise RuntimeError(f"preloading {count} events took over {PRELOAD_LIMIT_S:g}s")
        last = min(first + BATCH, start + count)
        batch = [_event(route, f"{prefix}-{n}", body_bytes) for n in range(first, last)]
        results = await asyncio.gather(*(store.ingest(event) for event in batch))
        if any(result is not None for result in results):
            raise RuntimeError("a preloaded event was taken for a duplicate")
        if progress is not None:
            progress(last)  # events of `prefix` queued so far


def _event(route: models.Route, request_id: str, body_bytes: int) -> models.IncomingEvent:
    return models.IncomingEvent(
        id=ids.new_id(),
        route=route,
        method="POST",
        path="",
        query="",
        headers=(
            ("Content-Type", "application/octet-stream"),
            (load.ID_HEADER, request_id),
        ),
        body=load.body_for(request_id, body_bytes),
        received_at=dt.datetime.now(dt.UTC),
        source="127.0.0.1",
    )


async def lease_cost(
    store: sql.SqlStore, output_id: str, *, batch: int = 64, rounds: int = 20
) -> float:
    """Median ms of `rounds` leases of `batch` deliveries (after one unmeasured lease).

    The leases are given back (released, no attempt counted as a failure beyond the
    store's own bookkeeping) so the backlog stays as it was for the next measurement.
    """
    times = []
    for n in range(rounds + 1):
        started = time.perf_counter()
        leases = await store.lease([output_id], limit=batch, lease_ms=60_000, holder="bench")
        elapsed = time.perf_counter() - started
        if len(leases) != batch:
            raise RuntimeError(f"leased {len(leases)} of {batch}: the backlog is too small")
        if n:
            times.append(elapsed * 1000)
        await store.settle(
            [
                models.Settlement(
                    lease_id=lease.lease_id, outcome=models.Outcome.RELEASED, retry_after_ms=0
                )
                for lease in leases
            ],
            agent="bench",
        )
    return statistics.median(times)
