"""Bucket policies end to end with real processes: dedup, retention, ordered outputs."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tests.acceptance import harness
from tests.acceptance.test_delivery import post

ROUTE_CACHE_S = 2.2  # the server reuses an input's bucket settings for 2 s


async def test_dedup_presets_from_the_cli_and_turning_dedup_off(relay: harness.Relay) -> None:
    await relay.cli("bucket", "update", "quickstart", "--dedup-preset", "github")
    shown = await relay.cli_json("bucket", "show", "quickstart")
    assert shown["policy"]["dedup_headers"] == ["X-Provider-Event-Id", "X-GitHub-Delivery"]
    relay.start()
    await relay.wait_ready()
    delivery = {"X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}
    first = await post(relay.input_url(), b'{"zen": 1}', delivery)
    again = await asyncio.gather(
        *(post(relay.input_url(), b'{"zen": 1}', delivery) for _ in range(5))
    )
    (event,) = await relay.cli_json("event", "list")
    assert first[0] == 200 and "X-Stowhook-Duplicate-Of" not in first[1]
    assert [(status, headers.get("X-Stowhook-Duplicate-Of")) for status, headers, _ in again] == [
        (200, event["id"])
    ] * 5, "a provider's retries are answered 200 and name the stored event"

    off = await relay.cli("bucket", "update", "quickstart", "--no-dedup")
    assert "dedup: off" in off.stdout
    await asyncio.sleep(ROUTE_CACHE_S)
    assert (await post(relay.input_url(), b'{"zen": 1}', delivery))[1].get(
        "X-Stowhook-Duplicate-Of"
    ) is None
    assert len(await relay.cli_json("event", "list")) == 2


async def test_bad_policy_flags_are_refused_with_the_reason(relay: harness.Relay) -> None:
    for flags, message in (
        (["--retention", "0s"], "retention_ms must be positive"),
        (["--dedup-header", "Not A Header"], "is not a header name"),
        (["--no-dedup", "--dedup-preset", "svix"], "cannot be combined"),
        (["--dedup-preset", "nope"], "'nope' is not one of"),
    ):
        result = await relay.cli("bucket", "update", "quickstart", *flags, check=False)
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)


async def test_the_cleaner_deletes_delivered_events_after_retention(
    relay: harness.Relay, agents: Any
) -> None:
    await relay.cli("bucket", "update", "quickstart", "--retention", "1s")
    relay.start("--retention-interval", "200ms")
    await relay.wait_ready()
    async with harness.Target() as target:
        agents(target.url)
        for n in range(3):
            assert (await post(relay.input_url(), f"{n}".encode()))[0] == 200
        await target.wait_for(3)
        await harness.wait_until(lambda: "retention_cleaned" in relay.log_text(), 15, "cleaner")
    assert await relay.cli_json("event", "list") == []
    status = await relay.cli_json("status")
    assert status["deliveries"]["delivered"] == 0, status


async def test_an_ordered_output_delivers_one_at_a_time_in_order_and_skips_the_dead(
    relay: harness.Relay, agents: Any
) -> None:
    await relay.cli("bucket", "update", "quickstart", "--max-attempts", "2")
    await relay.cli("output", "update", "default", "--bucket", "quickstart", "--ordered")
    listed = await relay.cli_json("output", "list", "--bucket", "quickstart")
    assert [(o["name"], o["ordered"]) for o in listed] == [("default", True)]
    relay.start()
    await relay.wait_ready()
    for n in range(6):
        assert (await post(relay.input_url(), f"event-{n}".encode()))[0] == 200
    concurrent = {"now": 0, "max": 0}

    async def respond(_n: int, request: web.Request) -> web.Response:
        concurrent["now"] += 1
        concurrent["max"] = max(concurrent["max"], concurrent["now"])
        try:
            await asyncio.sleep(0.05)
            body = await request.read()
            # event-1 always fails: it holds the line until it is dead-lettered.
            return web.Response(status=500 if body == b"event-1" else 200)
        finally:
            concurrent["now"] -= 1

    async with harness.Target(respond) as target:
        agents(target.url, "--max-in-flight", "8")
        await target.wait_for(7)
        arrivals = [r.body.decode() for r in target.received]
    assert concurrent["max"] == 1, "never more than one delivery in flight"
    assert arrivals == ["event-0", "event-1", "event-1", "event-2", "event-3", "event-4", "event-5"]
    (dead,) = await relay.cli_json("dlq", "list")
    assert dead["deliveries"][0]["attempts"] == 2


async def test_two_outputs_each_get_every_new_event(relay: harness.Relay, agents: Any) -> None:
    await relay.cli("output", "create", "audit", "--bucket", "quickstart")
    relay.start()
    await relay.wait_ready()
    async with harness.Target() as main, harness.Target() as audit:
        agents(main.url, name="main")
        agents(audit.url, "--output", "audit", name="audit")
        for n in range(3):
            assert (await post(relay.input_url(), f"{n}".encode()))[0] == 200
        await main.wait_for(3)
        await audit.wait_for(3)
        assert sorted(r.body for r in main.received) == sorted(r.body for r in audit.received)
    (event, *_) = await relay.cli_json("event", "list")
    assert sorted(d["output"] for d in event["deliveries"]) == ["audit", "default"]
    missing = await relay.cli("output", "delete", "nope", "--bucket", "quickstart", check=False)
    assert missing.returncode != 0 and "has no output 'nope'" in missing.stderr
