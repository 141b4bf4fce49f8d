"""Fault 7: PostgreSQL goes away during a load and comes back, with real processes.

Other tests share the PostgreSQL server, so it cannot really be restarted. What a restart
looks like to one relay is made on its database alone: new connections are refused
(`ALLOW_CONNECTIONS false`) and every open one is terminated (`pg_terminate_backend`,
"terminating connection due to administrator command"), for OUTAGE_S; then connections
are allowed again. Clients must see 200 or 503 + Retry-After, every 200 must be
delivered, and the relay must answer 200 again by itself, its agents still delivering.

One difference with SQLite: a COMMIT whose connection is terminated as it completes may
have been applied although the client saw the error (and got a 503). Such an event is
stored and delivered; the sender retries the 503 and the receiver sees a duplicate, as
at-least-once allows. The test bounds them by the requests that were in flight.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from aiohttp import ClientSession

from relay_server import errors
from relay_server.store import database
from tests import pg
from tests.acceptance import harness
from tests.faults.ledger import Ledger, Sink

pytestmark = pytest.mark.skipif(not pg.pg_available(), reason=pg.SKIP_REASON)

COUNT = 600
RATE = 150.0  # webhooks per second: the load lasts 4 s
CONCURRENCY = 8
OUTAGE_AFTER_S = 1.0
OUTAGE_S = 2.0


@pytest.fixture
async def pg_relay(tmp_path: pathlib.Path) -> AsyncIterator[harness.Relay]:
    async with pg.fresh_database("pg_faults") as url:
        relay = harness.Relay(home=tmp_path, postgres_url=url)
        try:
            yield relay
        finally:
            relay.stop()


class Outage:
    """One database made unreachable and reachable again, as a server restart would."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.started = 0.0
        self.ended = 0.0

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(pg.ADMIN_URL)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def run(self, duration_s: float) -> None:
        name = self.database.replace('"', '""')
        terminate = (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self.database}' AND pid <> pg_backend_pid()"
        )
        self.started = time.monotonic()
        await self._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false', terminate)
        await asyncio.sleep(0.2)
        await self._admin(terminate)  # a connection that was being opened at that moment
        await asyncio.sleep(duration_s - 0.2)
        await self._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        self.ended = time.monotonic()

    async def stored_events(self, url: str) -> int:
        conn = await asyncpg.connect(pg.url_for(pg.database_name(url), "postgresql"))
        try:
            return int(await conn.fetchval("SELECT count(*) FROM events"))
        finally:
            await conn.close()


async def readyz(port: int) -> int:
    async with ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status


async def test_a_postgresql_outage_gets_503s_loses_no_acknowledged_event_and_recovers(
    pg_relay: harness.Relay,
) -> None:
    relay = pg_relay
    await relay.setup()  # quickstart on PostgreSQL
    relay.start()
    await relay.wait_ready()
    outage = Outage(pg.database_name(relay.postgres_url))
    ledger = Ledger()
    started: list[harness.Agent] = []
    async with Sink(ledger) as sink:
        try:
            for n in range(2):
                started.append(harness.start_agent(relay, sink.url, name=f"agent{n}"))
            for agent in started:  # streams open before the outage: do they survive it?
                await harness.wait_logged(
                    agent.log_text, harness.logged("connected"), 20, "the agent to connect"
                )

            async def fault() -> int:
                await asyncio.sleep(OUTAGE_AFTER_S)
                task = asyncio.create_task(outage.run(OUTAGE_S))
                await asyncio.sleep(OUTAGE_S / 2)
                ready_during = await readyz(relay.http_port)
                await task
                return ready_during

            ready_during, _ = await asyncio.gather(
                fault(),
                ledger.load(relay.input_url(), COUNT, rate=RATE, concurrency=CONCURRENCY),
            )
            await ledger.wait_delivered(timeout=60)
            assert all(agent.proc.poll() is None for agent in started), "an agent gave up"
        finally:
            for agent in started:
                if agent.proc.poll() is None:
                    agent.kill()

    sent = list(ledger.sent.values())
    refused = [s for s in sent if s.status == 503]
    ok = ledger.accepted()
    after = [s.answered or 0 for s in ok if s.started >= outage.ended]
    recovery_ms = (min(after) - outage.ended) * 1000 if after else float("inf")
    report = ledger.report(
        recovery_ms=[recovery_ms],
        settings={"outage_s": str(OUTAGE_S), "rate": str(RATE), "concurrency": str(CONCURRENCY)},
    )
    stored = await outage.stored_events(relay.postgres_url)
    print(f"\npostgresql outage: stored {stored}\n{report.text()}")

    assert {s.status for s in sent} <= {200, 503}, report.text()
    assert refused, "the outage never reached a client: the test proved nothing"
    assert all(s.retry_after for s in refused), "a 503 without Retry-After"
    assert all(s.started < outage.ended + 1.0 for s in refused), "503s long after recovery"
    assert ready_during == 503
    assert await readyz(relay.http_port) == 200
    assert recovery_ms < 3000, report.text()
    report.assert_sound()  # every 200 delivered, nothing corrupted or unexpected
    # Stored: every 200, and at most the requests in flight when connections were cut.
    assert len(ok) <= stored <= len(ok) + CONCURRENCY, report.text()
    assert relay.proc is not None and relay.proc.poll() is None
    assert "side_task_failed" not in relay.log_text()


async def test_lost_connections_are_storage_unavailable_and_the_pool_recovers() -> None:
    """The store's own view: each way a restart shows up becomes StorageUnavailable (the
    ingress answers 503 + Retry-After to it), and the pool reconnects by itself."""
    async with pg.fresh_database("pg_pool") as url:
        db = database.Database(database.DatabaseSettings(url=url, pool_size=2))
        await db.migrate()
        await db.open()
        outage = Outage(pg.database_name(url))
        try:
            await db.probe_write()  # the pool holds a live connection now
            task = asyncio.create_task(outage.run(1.0))
            await asyncio.sleep(0.3)
            with pytest.raises(errors.StorageUnavailable, match="not currently accepting"):
                await db.probe_write()  # pooled connection dropped, new one refused
            await task
            await db.probe_write()  # no restart of the process: the pool reconnected
            async with db.read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        finally:
            await db.close()
