"""Moving an installation from SQLite to PostgreSQL with `relay-server migrate-data`.

Real processes: a SQLite relay takes events that end up delivered, dead, pending and
leased (its process killed while an agent held the lease); its data is copied into a fresh
PostgreSQL database; a relay on PostgreSQL with the same key file then delivers exactly
the pending and leased ones, and nothing else changes.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession, web

from tests import pg
from tests.acceptance import harness

pytestmark = pytest.mark.skipif(not pg.pg_available(), reason=pg.SKIP_REASON)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with pg.fresh_database("migrate_data") as url:
        yield url


async def post(relay: harness.Relay, count: int, tag: str) -> None:
    async with ClientSession() as session:
        for n in range(count):
            async with session.post(relay.input_url(), json={"tag": tag, "n": n}) as resp:
                assert resp.status == 200, await resp.text()


def ids_in(states: dict[str, dict[str, Any]], state: str) -> set[str]:
    return {event_id for event_id, d in states.items() if d["state"] == state}


async def migrate(relay: harness.Relay, url: str, *extra: str) -> tuple[dict[str, Any], str]:
    result = await relay.cli(
        "migrate-data", "--from", f"sqlite:///{relay.db_path}", "--to", url, "--json", *extra
    )
    return json.loads(result.stdout), result.stderr


async def test_pending_and_leased_events_are_delivered_from_postgresql_after_migrate_data(
    relay: harness.Relay, agents: Any, pg_url: str
) -> None:
    held = asyncio.Event()

    async def answer(_count: int, request: web.Request) -> web.StreamResponse:
        tag = (await request.json())["tag"]
        if tag == "leased":
            await held.wait()  # the agent holds this lease until the end
        return web.Response(status=500 if tag == "dead" else 200)

    relay.start()
    await relay.wait_ready()
    await relay.cli("bucket", "update", "quickstart", "--max-attempts", "1")
    async with harness.Target(answer) as old_target:
        agent = agents(old_target.url, "--max-in-flight", "1")
        await post(relay, 2, "dead")
        await post(relay, 3, "delivered")
        await harness.wait_deliveries(
            relay,
            lambda s: len(ids_in(s, "dead")) == 2 and len(ids_in(s, "delivered")) == 3,
            20,
            "2 dead and 3 delivered",
        )
        await post(relay, 1, "leased")
        await old_target.wait_for(6)
        await post(relay, 3, "pending")  # the agent is busy: they wait
        await asyncio.sleep(0.3)  # a second lease would show now
        relay.kill()  # SIGKILL while the agent holds its lease: nothing gives it back
        agent.kill()
        held.set()

    events_before = {e["id"]: e for e in await relay.cli_json("event", "list", "--limit", "100")}
    before = {event_id: e["deliveries"][0] for event_id, e in events_before.items()}
    dead, delivered = ids_in(before, "dead"), ids_in(before, "delivered")
    leased, pending = ids_in(before, "leased"), ids_in(before, "pending")
    assert (len(dead), len(delivered), len(leased), len(pending)) == (2, 3, 1, 3), before
    dlq_before = await relay.cli_json("dlq", "list", "--limit", "100")

    report, progress = await migrate(relay, pg_url)
    assert report["ok"] is True, report
    counts = {t["table"]: t for t in report["tables"]}
    assert counts["events"]["copied"] == counts["events"]["source"] == 9
    assert counts["deliveries"]["copied"] == 9
    assert counts["accounts"]["copied"] == 1 and counts["agent_tokens"]["copied"] == 1
    assert counts["attempts"]["copied"] == counts["attempts"]["source"] > 0
    assert "events: 9/9" in progress and "deliveries: 9/9" in progress

    # The same installation (key file, ids, token), served from PostgreSQL.
    moved = harness.Relay(home=relay.home, postgres_url=pg_url, starts=relay.starts)
    moved.token, moved.input_id = relay.token, relay.input_id
    agent_after: harness.Agent | None = None
    try:
        moved.start()
        await moved.wait_ready()
        async with harness.Target() as target:
            agent_after = harness.start_agent(moved, target.url, name="after")
            await target.wait_for(4)
            await asyncio.sleep(1.0)  # anything more would be a delivered or dead event
            assert Counter(target.event_ids()) == {i: 1 for i in leased | pending}
        after = await harness.wait_deliveries(
            moved, lambda s: len(ids_in(s, "delivered")) == 7, 20, "7 delivered"
        )
        assert ids_in(after, "dead") == dead
        events_after = {e["id"]: e for e in await moved.cli_json("event", "list", "--limit", "100")}
        for event_id in dead | delivered:
            assert events_after[event_id] == events_before[event_id]
        assert await moved.cli_json("dlq", "list", "--limit", "100") == dlq_before
    finally:
        if agent_after is not None:
            agent_after.kill()
        moved.stop()

    again, _ = await migrate(relay, pg_url)
    assert again["ok"] is True and again["copied"] == 0, again
    audit = await moved.cli_json("audit", "list", "--action", "data.migrate")
    assert [entry["result"] for entry in audit] == ["ok", "ok"]


async def test_migrate_data_refuses_a_database_of_another_installation(
    relay: harness.Relay, pg_url: str
) -> None:
    other = harness.Relay(home=relay.home, postgres_url=pg_url)
    await other.cli("account", "create", "someone-else")

    refused = await relay.cli(
        "migrate-data", "--from", f"sqlite:///{relay.db_path}", "--to", pg_url, check=False
    )
    assert refused.returncode != 0
    assert "1 account(s) the source does not have (someone-else)" in refused.stderr
    assert "--force" in refused.stderr
    assert [a["name"] for a in await other.cli_json("account", "list")] == ["someone-else"]

    forced, _ = await migrate(relay, pg_url, "--force")
    assert forced["ok"] is True
    names = sorted(a["name"] for a in await other.cli_json("account", "list"))
    assert names == ["default", "someone-else"]
