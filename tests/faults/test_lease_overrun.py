"""Fault 4: a destination slower than the lease, real processes.

While the sink works, the agent sends Extend every lease/3, so the server never takes
the event back: each event arrives once, on attempt 1, however long past the lease the
sink takes (within the agent's --timeout). The contrast shows the test can fail: an
agent frozen with SIGSTOP sends no heartbeats, its lease runs out and another agent gets
the event; when it thaws, its late ACK of the expired lease is refused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from aiohttp import web

from tests.acceptance import harness
from tests.faults.ledger import Arrival, HoldNext, Ledger, Sink

LEASE_MS = 1500
SINK_DELAY_S = 5.0  # more than three leases
AGENT_TIMEOUT_S = 15  # the agent's --timeout: above the sink's delay
EVENTS = 6  # in parallel
# The frozen agent's standby gets the event on a later attempt within this (the frozen
# agent's session may win a few rounds of the race for it, each one a lease long)...
REDELIVERY_TIMEOUT_S = 45.0
# ...while the server's keepalive leaves the frozen agent's connection alone, so that its
# late ACK does reach the server.
FROZEN_KEEPALIVE = ("--grpc-keepalive-time", "2m")


def all_settled(found: dict[str, dict[str, Any]]) -> bool:
    return bool(found) and all(d["state"] not in ("pending", "leased") for d in found.values())


async def test_a_sink_slower_than_the_lease_gets_each_event_once(
    relay: harness.Relay, agents
) -> None:
    relay.start("--lease-ms", str(LEASE_MS))
    await relay.wait_ready()
    ledger = Ledger()

    async def slow(_arrival: Arrival, _request: web.Request) -> None:
        await asyncio.sleep(SINK_DELAY_S)

    async with Sink(ledger, slow) as sink:
        agent = agents(
            sink.url,
            *("--timeout", str(AGENT_TIMEOUT_S), "--max-in-flight", str(EVENTS)),
            *("--log-level", "debug"),  # to count the Extend frames (leases_extended)
        )
        await harness.wait_logged(agent.log_text, harness.logged("connected"), 20, "a stream")
        await ledger.load(relay.input_url(), EVENTS, concurrency=EVENTS)
        found = await harness.wait_deliveries(relay, all_settled, SINK_DELAY_S * 4, "the ACKs")
    extends = [e for e in harness.log_events(agent.log_text()) if e["event"] == "leases_extended"]
    report = ledger.report(
        settings={
            "lease_ms": str(LEASE_MS),
            "sink_delay_s": f"{SINK_DELAY_S:g}",
            "agent_timeout_s": str(AGENT_TIMEOUT_S),
            "sqlite_synchronous": "FULL",
        }
    )
    leases = SINK_DELAY_S * 1000 / LEASE_MS
    print(
        f"\n{EVENTS} events, each held {SINK_DELAY_S:g}s by the sink ({leases:.1f} leases): "
        f"{len(extends)} Extend frames, sink in flight at most {sink.max_in_flight}\n"
        + report.text()
    )
    report.assert_sound(max_copies=1)
    assert report.delivered_unique == EVENTS, report.text()
    assert {a.attempt for a in ledger.arrivals} == {"1"}, "an event came again on a later attempt"
    assert {(d["state"], d["attempts"]) for d in found.values()} == {("delivered", 1)}, (
        f"the server took an event back while the sink still worked on it: {found}"
    )


async def test_a_frozen_agent_loses_its_lease_and_its_late_ack_is_refused(
    relay: harness.Relay, agents
) -> None:
    relay.start("--lease-ms", str(LEASE_MS), *FROZEN_KEEPALIVE)
    await relay.wait_ready()
    ledger, hold = Ledger(), HoldNext()
    async with Sink(ledger, hold) as sink:
        frozen = agents(sink.url, "--timeout", str(AGENT_TIMEOUT_S), name="frozen")
        await harness.wait_logged(frozen.log_text, harness.logged("connected"), 20, "a stream")
        hold.arm()
        await ledger.load(relay.input_url(), 1)
        held = await hold.wait_held(20)
        received = await harness.wait_logged(
            frozen.log_text,
            harness.logged("delivery_received", event_id=held.event_id),
            5,
            "the lease",
        )
        lease_1 = received["lease_id"]

        os.kill(frozen.proc.pid, signal.SIGSTOP)  # no heartbeats from now on
        stopped_at = time.monotonic()
        try:
            hold.release()  # the sink's 200 waits in the frozen agent's socket
            agents(sink.url, name="standby")
            await harness.wait_logged(
                relay.log_text, harness.logged("lease_expired", lease_id=lease_1), 20, "expiry"
            )
            await harness.wait_deliveries(
                relay, all_settled, REDELIVERY_TIMEOUT_S, "the standby agent's ACK"
            )
            frozen_s = time.monotonic() - stopped_at
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        await harness.wait_logged(
            frozen.log_text, harness.logged("delivery_acked", lease_id=lease_1), 10, "the late ACK"
        )
        await harness.wait_logged(
            frozen.log_text, harness.logged("lease_lost", lease_id=lease_1), 10, "the refusal"
        )
        attempts = await harness.assert_delivered_once(relay, held.event_id)

    sink_got = [a.attempt for a in ledger.arrivals]
    print(
        f"\nagent frozen {frozen_s:.1f}s (lease {LEASE_MS} ms); its late ACK of {lease_1} "
        f"was refused\nattempts: {harness.attempt_history(attempts)}; "
        f"the sink got attempts {sink_got}"
    )
    assert attempts[0]["outcome"] == "lease_expired", harness.attempt_history(attempts)
    assert attempts[-1]["agent"].endswith("/standby"), "no other agent got the event"
    assert len(sink_got) == len(set(sink_got)) > 1, f"the sink got attempts {sink_got}"
    assert not [e for e in harness.log_events(frozen.log_text()) if e["event"] == "disconnected"], (
        "the frozen agent's stream broke: its late ACK never reached the server"
    )
    ledger.report().assert_sound()
