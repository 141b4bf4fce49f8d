"""`relay-server keys rotate` against a running server: delivery goes on across the rotation."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from aiohttp import ClientSession

from tests.acceptance import harness

BEFORE, DURING = 150, 50


async def send(relay: harness.Relay, bodies: list[bytes]) -> None:
    async with ClientSession() as session:
        for body in bodies:
            async with session.post(relay.input_url(), data=body) as answer:
                assert answer.status == 200


@pytest.mark.timeout(180)
async def test_rotation_while_serving_keeps_old_and_new_events_deliverable(
    running: harness.Relay, agents: Any
) -> None:
    relay = running
    old = [f'{{"before": {n}}}'.encode() for n in range(BEFORE)]
    new = [f'{{"during": {n}}}'.encode() for n in range(DURING)]
    await send(relay, old)  # sealed with k1, waiting: no agent yet

    started = time.time()
    rotation = asyncio.create_task(
        relay.cli("keys", "rotate", "--reload-wait", "3s", "--batch-size", "50", "--json")
    )
    async with harness.Target() as target:
        agents(target.url)
        await send(relay, new)  # some sealed with k1, some with k2: the server reloads
        done = await rotation
        await target.wait_for(BEFORE + DURING, timeout=60)

    summary = json.loads(done.stdout)
    assert summary["primary"] == "k2" and summary["previous_primary"] == "k1"
    assert summary["failed"] == 0 and summary["reencrypted"] == summary["total"] >= 3 * BEFORE
    assert sorted(r.body for r in target.received) == sorted(old + new)
    reloaded = await harness.wait_logged(
        relay.log_text, harness.logged("keys_reloaded", primary="k2"), 10, "keys_reloaded"
    )
    assert reloaded["key_ids"] == ["k1", "k2"]
    assert harness.logged_at(reloaded) - started < 3.0  # before re-encryption began

    listed = {k["key_id"]: k for k in await relay.cli_json("keys", "list")}
    assert listed["k1"]["total"] == 0 and not listed["k1"]["primary"]
    assert listed["k2"]["primary"] and listed["k2"]["total"] == 3 * (BEFORE + DURING)
    refused = await relay.cli("keys", "remove", "k2", check=False)
    assert refused.returncode == 1 and "is the primary" in refused.stderr
    await relay.cli("keys", "remove", "k1")
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)  # re-read at once, no wait for the next check
    await harness.wait_logged(
        relay.log_text, harness.logged("keys_reloaded", removed=["k1"]), 10, "k1 dropped"
    )
    shown = await relay.cli_json("event", "show", target.event_ids()[0])
    assert shown["body"] in {b.decode() for b in old + new}
    actions = [e["action"] for e in await relay.cli_json("audit", "list", "--action", "keys")]
    assert actions == ["keys.remove", "keys.rotate"]
