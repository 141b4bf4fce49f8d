"""Retention at scale: ingest while the cleaner deletes a backlog; table size over cycles.

    python -m bench.retention [--engine postgres|sqlite] [--quick]

A real `relay-server serve` (--retention-interval 500ms) on a database of its own
(PostgreSQL: stowhook_bench_<random>, dropped at the end). Old events are preloaded through
the store's own API, as the server would have stored them: ingested (sealed), leased and
acknowledged. They carry received_at two days back, inside the bucket's 7-day retention,
so the cleaner leaves them alone until the bench shortens the retention to one day.

Figures, each against a baseline measured in the same run on the same machine:

  ingest_rate_while_cleaning    1 KiB POSTs answered 2xx per second over 64 connections
                                (bench.load, a process of its own) while the cleaner deletes
                                the backlog, vs ingest_rate_idle_cleaner: the mean of the same
                                load just before and just after, the cleaner running with
                                nothing to delete. Goal: ratio >= 0.9.
  cleaner_rows_deleted_per_s    rows the cleaner deleted per second meanwhile (each backlog
                                event goes with its one delivery and one attempt: 3 rows).
  table_size_last_cycle         events + deliveries + attempts (pg_total_relation_size;
                                SQLite: the database's pages) after the last of several
                                fill/expire cycles vs table_size_first_cycle. Each cycle
                                acknowledges the previous fill, stores a new one, waits for the
                                cleaner to delete the old one and for the dead rows to be
                                reclaimed; without reuse every cycle would add a fill's worth.
                                Goal: ratio <= 1.2.

Reclaiming on PostgreSQL is autovacuum's job (migration 0006 tunes it for these tables).
Where the server has autovacuum off, or in --quick (autovacuum_naptime is a minute), the
bench runs the same plain VACUUM itself and says so. Only 127.0.0.1 is contacted; every
loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from bench import figures, load, procs, relay
from relay_server import ids, models
from relay_server.store import sql, tables

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
ROWS_PER_EVENT = 3  # a backlog event goes with its one delivery and its one attempt
CONNECTIONS = 64
BODY_BYTES = 1024
CHUNK = 2000  # events ingested, leased or acknowledged per call
CLEANER_INTERVAL = "500ms"
CYCLE_BUCKET = "many0"  # the fill/expire cycles run in a bucket the ingest load never touches
POLL_S = 0.25
DRAIN_TIMEOUT_S = 300.0  # the cleaner must delete what expired within this
AUTOVACUUM_WAIT_S = 90.0  # how long a cycle waits for autovacuum before vacuuming itself
TABLES = ("events", "deliveries", "attempts")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    backlog: int  # old delivered events the cleaner deletes while ingest is measured
    window_s: float  # each ingest window
    rounds: int  # ingest windows with the cleaner deleting (one more with it idle)
    cycle_events: int  # events filled, then expired, per cycle
    cycles: int


FULL = Sizes(backlog=50_000, window_s=10.0, rounds=2, cycle_events=10_000, cycles=3)
QUICK = Sizes(backlog=10_000, window_s=2.5, rounds=2, cycle_events=6_000, cycles=3)


def say(text: str) -> None:
    print(f"bench.retention: {text}", file=sys.stderr, flush=True)


async def run(*, engine: str, quick: bool) -> list[figures.Figure]:
    """Every figure of this module (see the module docstring)."""
    sizes = QUICK if quick else FULL
    databases = relay.Databases()
    with tempfile.TemporaryDirectory(prefix="stowhook-retention-") as tmp:
        folder = pathlib.Path(tmp)
        try:
            template = await relay.make_template(folder, engine, databases)
            inst = relay.Installation(
                template=template, folder=folder, database_url=template.database_url
            )
            store = inst.open_store()
            await store.open()
            try:
                return await _measure(inst, store, sizes, quick=quick)
            finally:
                await store.close()
        finally:
            await databases.drop_all()


async def _measure(
    inst: relay.Installation, store: sql.SqlStore, sizes: Sizes, *, quick: bool
) -> list[figures.Figure]:
    account = await store.get_account("default")
    backlog = await store.get_bucket(account.id, relay.BUCKET)
    old_ms = models.now_ms() - 2 * DAY_MS
    started = time.monotonic()
    await fill(store, inst.template.inputs[relay.BUCKET], sizes.backlog, old_ms, delivered=True)
    say(f"preloaded {sizes.backlog} delivered events in {time.monotonic() - started:.1f}s")
    async with procs.Group(inst.folder) as group:
        await inst.serve(group, "--retention-interval", CLEANER_INTERVAL)
        started = time.monotonic()
        ingest = await _ingest_figures(inst, store, group, backlog, sizes)
        say(f"ingest windows took {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        cycles = await _cycle_figure(inst, store, account.id, sizes, quick=quick)
        say(f"fill/expire cycles took {time.monotonic() - started:.1f}s")
    return [*ingest, cycles]


# ---- ingest while the cleaner deletes -------------------------------------------------


async def _ingest_figures(
    inst: relay.Installation,
    store: sql.SqlStore,
    group: procs.Group,
    bucket: models.Bucket,
    sizes: Sizes,
) -> list[figures.Figure]:
    """Ingest windows taken in turn with the backlog kept (retention 7 days: the cleaner
    runs and finds nothing) and expired (1 day: the cleaner deletes it), ending with a
    kept one; the cleaner reads the retention afresh for every batch it takes."""
    url = inst.input_url(relay.BUCKET)
    idle: list[float] = []
    busy: list[float] = []
    deleted, busy_s = 0, 0.0
    for n in range(sizes.rounds):
        await _set_retention(store, bucket, WEEK_MS)
        idle.append((await _flood(group, f"idle-{n}", url, sizes.window_s))["rate"])
        await _set_retention(store, bucket, DAY_MS)
        cutoff = models.now_ms() - DAY_MS
        left, started = await _old_events(store, bucket.id, cutoff), time.monotonic()
        busy.append((await _flood(group, f"cleaning-{n}", url, sizes.window_s))["rate"])
        now_left = await _old_events(store, bucket.id, cutoff)
        deleted, busy_s = deleted + left - now_left, busy_s + time.monotonic() - started
        if now_left == 0:
            say("the backlog ran out: a cleaning window partly measured an idle cleaner")
    await _set_retention(store, bucket, WEEK_MS)
    idle.append((await _flood(group, f"idle-{sizes.rounds}", url, sizes.window_s))["rate"])
    say(
        f"ingest req/s with the cleaner idle {[round(r) for r in idle]}, deleting "
        f"{[round(r) for r in busy]}; it deleted {deleted} events in {busy_s:.1f}s"
    )
    return [
        figures.ratio_figure(
            "ingest_rate_while_cleaning",
            statistics.fmean(busy),
            "req/s",
            "ingest_rate_idle_cleaner",
            statistics.fmean(idle),
            at_least=0.9,
        ),
        figures.Figure(
            name="cleaner_rows_deleted_per_s",
            value=round(ROWS_PER_EVENT * deleted / busy_s, 1),
            unit="rows/s",
        ),
    ]


async def _flood(group: procs.Group, name: str, url: str, seconds: float) -> dict[str, Any]:
    result = await load.flood(group, name, [url], connections=CONNECTIONS, seconds=seconds)
    if result["errors"]:
        say(f"{name}: requests not answered 2xx: {result['errors']}")
    return result


async def _set_retention(store: sql.SqlStore, bucket: models.Bucket, retention_ms: int) -> None:
    """Change the bucket's retention; the running server's cleaner uses it from its next
    batch on."""
    bucket = await store.get_bucket(bucket.account_id, bucket.name)
    await store.update_bucket(bucket, dataclasses.replace(bucket.policy, retention_ms=retention_ms))


# ---- size over fill/expire cycles ------------------------------------------------------


async def _cycle_figure(
    inst: relay.Installation, store: sql.SqlStore, account_id: str, sizes: Sizes, *, quick: bool
) -> figures.Figure:
    bucket = await store.get_bucket(account_id, CYCLE_BUCKET)
    input_id = inst.template.inputs[CYCLE_BUCKET]
    await _set_retention(store, bucket, DAY_MS)
    cutoff = models.now_ms() - DAY_MS
    old_ms = cutoff - DAY_MS
    await fill(store, input_id, sizes.cycle_events, old_ms, delivered=False)
    measured: list[int] = []
    for cycle in range(1, sizes.cycles + 1):
        await acknowledge_all(store, input_id)  # the previous fill may go now
        old_ms += sizes.cycle_events
        await fill(store, input_id, sizes.cycle_events, old_ms, delivered=False)
        await _until(
            lambda: _old_events(store, bucket.id, cutoff),
            below=sizes.cycle_events + 1,
            what=f"delete cycle {cycle}'s expired fill",
        )
        how = await reclaim(store, quick=quick)
        measured.append(await table_bytes(store))
        say(f"cycle {cycle}: {measured[-1] / 2**20:.1f} MiB after the expiry ({how})")
    return figures.ratio_figure(
        "table_size_last_cycle",
        measured[-1] / 2**20,
        "MiB",
        "table_size_first_cycle",
        measured[0] / 2**20,
        at_most=1.2,
    )


async def reclaim(store: sql.SqlStore, *, quick: bool) -> str:
    """Have the dead rows made reusable; returns how."""
    if store.db.dialect != "postgresql":
        return "SQLite reuses freed pages itself"
    async with store.db.engine.connect() as conn:
        autovacuum = await conn.scalar(sa.text("SHOW autovacuum"))
    if autovacuum == "on" and not quick:
        deadline = time.monotonic() + AUTOVACUUM_WAIT_S
        while time.monotonic() < deadline:
            if await _vacuumed(store):
                return "autovacuum"
            await asyncio.sleep(1.0)
        why = f"autovacuum did not come within {AUTOVACUUM_WAIT_S:g}s"
    else:
        why = "--quick" if autovacuum == "on" else "autovacuum is off on this server"
    async with store.db.engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(sa.text(f"VACUUM {', '.join(TABLES)}"))
    return f"plain VACUUM by the bench: {why}"


async def _vacuumed(store: sql.SqlStore) -> bool:
    """Whether each table holds no more dead rows than makes autovacuum visit it (1000 +
    2 % of its live rows, as migration 0006 sets): what autovacuum keeps them at."""
    async with store.db.engine.connect() as conn:
        query = sa.text(
            "SELECT bool_and(n_dead_tup <= 1000 + 0.02 * n_live_tup) FROM pg_stat_user_tables "
            "WHERE relname IN ('events', 'deliveries', 'attempts')"
        )
        return bool(await conn.scalar(query))


async def table_bytes(store: sql.SqlStore) -> int:
    """PostgreSQL: events + deliveries + attempts with their indexes and TOAST. SQLite: the
    database's pages (the freelist included: a file never shrinks without VACUUM)."""
    async with store.db.engine.connect() as conn:
        if store.db.dialect == "postgresql":
            sizes = [f"pg_total_relation_size('{table}')" for table in TABLES]
            return int(await conn.scalar(sa.text(f"SELECT {' + '.join(sizes)}")) or 0)
        pages = await conn.scalar(sa.text("PRAGMA page_count"))
        page_size = await conn.scalar(sa.text("PRAGMA page_size"))
        return int(pages or 0) * int(page_size or 0)


# ---- preloading through the store's API ------------------------------------------------


async def fill(
    store: sql.SqlStore, input_id: str, count: int, first_ms: int, *, delivered: bool
) -> None:
    """Ingest `count` 1 KiB events received 1 ms apart from `first_ms` (CHUNK at a time,
    which the store commits as one group), then acknowledge them if `delivered`."""
    route = await store.route(input_id)
    assert route is not None, f"no input {input_id}"
    body = os.urandom(BODY_BYTES)
    for start in range(0, count, CHUNK):
        batch = [
            _incoming(route, body, first_ms + n) for n in range(start, min(count, start + CHUNK))
        ]
        answers = await asyncio.gather(*(store.ingest(event) for event in batch))
        assert not any(answers), "preloaded events carry no dedup id"
    if delivered:
        await acknowledge_all(store, input_id)


def _incoming(route: models.Route, body: bytes, received_ms: int) -> models.IncomingEvent:
    return models.IncomingEvent(
        id=ids.new_id(),
        route=route,
        method="POST",
        path="/hook",
        query="",
        headers=(("Content-Type", "application/octet-stream"),),
        body=body,
        received_at=dt.datetime.fromtimestamp(received_ms / 1000, dt.UTC),
        source="127.0.0.1",
    )


async def acknowledge_all(store: sql.SqlStore, input_id: str) -> int:
    """Lease every pending delivery of the input's bucket and ACK it, as an agent would."""
    route = await store.route(input_id)
    assert route is not None, f"no input {input_id}"
    done = 0
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        leases = await store.lease(route.output_ids, limit=CHUNK, lease_ms=600_000, holder="bench")
        if not leases:
            return done
        ack = models.Outcome.ACK
        lost = await store.settle(
            [models.Settlement(lease_id=lease.lease_id, outcome=ack) for lease in leases],
            agent="bench",
        )
        assert not lost, f"{len(lost)} acknowledgements found their lease gone"
        done += len(leases)
    raise RuntimeError(f"acknowledging took longer than {DRAIN_TIMEOUT_S:g}s")


async def _old_events(store: sql.SqlStore, bucket_id: str, cutoff: int) -> int:
    events = tables.events
    async with store.db.read() as conn:
        query = sa.select(sa.func.count()).where(
            events.c.bucket_id == bucket_id, events.c.received_at < cutoff
        )
        return int(await conn.scalar(query) or 0)


async def _until(count: Callable[[], Awaitable[int]], *, below: int, what: str) -> None:
    """Poll `count()` until it is under `below`, at most DRAIN_TIMEOUT_S."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while await count() >= below:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cleaner did not {what} within {DRAIN_TIMEOUT_S:g}s")
        await asyncio.sleep(POLL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--engine", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--quick", action="store_true", help="smaller, under a minute")
    options = parser.parse_args()
    started = time.monotonic()
    found = procs.run_fast(run(engine=options.engine, quick=options.quick))
    for fig in found:
        print(fig.as_json())
    print()
    print(figures.table(found))
    print(
        f"\n{options.engine}{' --quick' if options.quick else ''}, {os.cpu_count()} CPUs, "
        f"{time.monotonic() - started:.0f}s; figures from a shared machine are noisy: "
        "compare the ratios"
    )


if __name__ == "__main__":
    main()
