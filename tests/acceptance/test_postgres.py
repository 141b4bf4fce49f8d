"""The quickstart path on PostgreSQL with real processes: `relay-server --database-url
postgresql://...` quickstart -> serve -> webhook -> agent -> internal URL, across a restart.

The database is a fresh one on the test server (tests/pg.py), created empty so quickstart
runs the migrations itself, and dropped afterwards.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession

from tests import pg
from tests.acceptance import harness

pytestmark = pytest.mark.skipif(not pg.pg_available(), reason=pg.SKIP_REASON)


@pytest.fixture
async def pg_relay(tmp_path: pathlib.Path) -> AsyncIterator[harness.Relay]:
    async with pg.fresh_database("acceptance") as url:
        # The plain form an operator types: the server picks the asyncpg driver itself.
        relay = harness.Relay(
            home=tmp_path, postgres_url=pg.url_for(pg.database_name(url), "postgresql")
        )
        try:
            yield relay
        finally:
            relay.stop()


async def post(url: str, body: bytes) -> int:
    async with ClientSession() as session:
        async with session.post(url, data=body) as resp:
            return resp.status


async def test_quickstart_and_serve_deliver_a_webhook_through_postgresql(
    pg_relay: harness.Relay,
) -> None:
    relay = pg_relay
    await relay.setup()  # quickstart: migrations, bucket, input and agent token, on PostgreSQL
    assert not relay.db_path.exists(), "no SQLite file: everything lives in PostgreSQL"
    relay.start()
    await relay.wait_ready()
    started: list[harness.Agent] = []
    try:
        async with harness.Target() as target:
            started.append(harness.start_agent(relay, f"{target.url}/hooks"))
            assert await post(relay.input_url(tail="/first"), b'{"n": 1}') == 200
            await target.wait_for(1)
            await acknowledged(relay, 1)  # a kill before the ACK commits would redeliver
            started[0].kill()
            relay.stop()  # the queue survives a restart: it is in the database
            assert await _post_refused(relay), "ingress is down while the server is"
            relay.start()
            await relay.wait_ready()
            assert await post(relay.input_url(tail="/second"), b'{"n": 2}') == 200
            started.append(harness.start_agent(relay, f"{target.url}/hooks", name="agent2"))
            await target.wait_for(2)
            await acknowledged(relay, 2)
    finally:
        for agent in started:
            if agent.proc.poll() is None:
                agent.kill()
    assert [(r.path, r.body) for r in target.received] == [
        ("/hooks/first", b'{"n": 1}'),
        ("/hooks/second", b'{"n": 2}'),
    ]
    listed = await relay.cli_json("event", "list")
    assert len(listed) == 2
    assert all([d["state"] for d in event["deliveries"]] == ["delivered"] for event in listed), (
        listed
    )


async def acknowledged(relay: harness.Relay, count: int) -> None:
    """Wait until `count` events are stored, each with its delivery DELIVERED (its ACK
    committed): the target having them does not mean the agent's ACK has landed."""
    await harness.wait_deliveries(
        relay,
        lambda found: [d["state"] for d in found.values()] == ["delivered"] * count,
        timeout=15,
        what=f"{count} deliveries acknowledged",
    )


async def _post_refused(relay: harness.Relay) -> bool:
    try:
        await post(relay.input_url(), b"{}")
    except OSError:
        return True
    return False
