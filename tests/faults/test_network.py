"""Fault 3: the agent<->server path goes silently dead, real processes, a proxy in between.

The agent dials the server through tests/faults/proxy.py, which the test cuts without
closing anything, as a dropped NAT entry or a pulled cable would: no FIN, no RST, writes
still succeed. Only keepalive pings can tell either side, and only leases protect the
events the agent held.

* A cut longer than the keepalive bound: both sides notice within keepalive time +
  timeout, the server hands back the lease the dead stream held, the agent drops the
  delivery it was working on (it can no longer settle it) and reconnects once the path
  heals; nothing sent before, during or after the cut is lost.
* A blip shorter than the keepalive bound but longer than the lease: the connection
  survives, the lease does not. The ACK the agent wrote into the blip reaches the server
  after the lease expired: it is refused, and a later attempt (by this agent or by one
  connected directly) settles the event, once.
"""

from __future__ import annotations

import time
from typing import Any

from tests.acceptance import harness
from tests.faults.ledger import Arrival, HoldNext, Ledger, Sink
from tests.faults.proxy import Proxy

# Short keepalive, as a user would set it: ping after 1 s of silence, give up 1 s later.
KEEPALIVE_S = (1, 1)
ALLOWED_AGENT_PING = "500ms"  # the server must accept pings that often
# What the bound allows on top of time + timeout: timer slack on a loaded CI machine.
DETECTION_SLACK_S = 3.0
BATCH = 20  # events sent before, during and after the cut
# The blip lasts until the lease expired and the agent wrote its ACK (about 3 s): longer
# than the lease, far shorter than the keepalive bound.
BLIP_LEASE_MS = 1500
BLIP_KEEPALIVE_S = (1, 30)


def server_keepalive(time_s: int, timeout_s: int) -> tuple[str, ...]:
    return (
        "--grpc-keepalive-time",
        f"{time_s}s",
        "--grpc-keepalive-timeout",
        f"{timeout_s}s",
        "--grpc-min-agent-ping",
        ALLOWED_AGENT_PING,
    )


def agent_keepalive(time_s: int, timeout_s: int) -> tuple[str, ...]:
    return ("--keepalive-time", str(time_s), "--keepalive-timeout", str(timeout_s))


def all_delivered(found: dict[str, dict[str, Any]]) -> bool:
    return {delivery["state"] for delivery in found.values()} == {"delivered"}


def logged(agent: harness.Agent, name: str) -> list[dict[str, Any]]:
    return [e for e in harness.log_events(agent.log_text()) if e["event"] == name]


async def hold_one(relay: harness.Relay, ledger: Ledger, hold: HoldNext) -> Arrival:
    """BATCH events delivered and ACKed, then one more that the sink holds: its Arrival."""
    await ledger.load(relay.input_url(), BATCH)
    await harness.wait_deliveries(relay, all_delivered, 30, "the first events to be ACKed")
    hold.arm()
    await ledger.load(relay.input_url(), 1)
    return await hold.wait_held(20)


async def test_a_silent_cut_is_detected_within_keepalive_and_nothing_is_lost(
    relay: harness.Relay, agents
) -> None:
    relay.start(*server_keepalive(*KEEPALIVE_S))
    await relay.wait_ready()
    ledger, hold = Ledger(), HoldNext()
    async with Proxy(relay.grpc_address) as proxy, Sink(ledger, hold) as sink:
        agent = agents(sink.url, *agent_keepalive(*KEEPALIVE_S), server=proxy.address)
        await harness.wait_logged(agent.log_text, harness.logged("connected"), 20, "a stream")
        held = await hold_one(relay, ledger, hold)  # the agent holds its lease meanwhile

        cut_at = time.time()
        proxy.cut()
        await ledger.load(relay.input_url(), BATCH)  # ingress is not behind the cut
        agent_saw = await harness.wait_logged(
            agent.log_text, harness.logged("disconnected", since=cut_at), 30, "the agent"
        )
        server_saw = await harness.wait_logged(
            relay.log_text, harness.logged("agent_disconnected", since=cut_at), 30, "the server"
        )
        await harness.wait_deliveries(
            relay, lambda found: found[held.event_id]["state"] == "pending", 20, "the lease back"
        )
        hold.release()  # the sink answers at last; the agent gave that lease up already

        healed_at, healed_mono = time.time(), time.monotonic()
        proxy.heal()
        reconnected = await harness.wait_logged(
            agent.log_text, harness.logged("connected", since=healed_at), 60, "a new stream"
        )
        await ledger.load(relay.input_url(), BATCH)
        await harness.wait_until(
            lambda: ledger.all_accepted_delivered() and ledger.copies()[held.load_id] >= 2,
            60,
            "every event, and the held one again",
        )
        await harness.wait_deliveries(relay, all_delivered, 30, "every event to be ACKed")
        attempts = await harness.assert_delivered_once(relay, held.event_id)

    bound_s = sum(KEEPALIVE_S) + DETECTION_SLACK_S
    agent_s = harness.logged_at(agent_saw) - cut_at
    server_s = harness.logged_at(server_saw) - cut_at
    redelivered = max(a.at for a in ledger.arrivals if a.load_id == held.load_id)
    report = ledger.report(
        recovery_ms=[
            (harness.logged_at(reconnected) - healed_at) * 1000,
            (redelivered - healed_mono) * 1000,
        ],
        settings={
            "keepalive": f"{KEEPALIVE_S[0]}s+{KEEPALIVE_S[1]}s (agent and server)",
            "lease_ms": "3000",
            "sqlite_synchronous": "FULL",
        },
    )
    print(
        f"\ncut noticed by the agent after {agent_s:.2f}s ({agent_saw.get('error')}), "
        f"by the server after {server_s:.2f}s (bound {bound_s:.0f}s)\n"
        f"held event: {harness.attempt_history(attempts)}\n"
        f"recovery = agent reconnected, held event delivered again (ms after the heal)\n"
        + report.text()
    )
    assert agent_s <= bound_s, f"the agent noticed the dead path {agent_s:.1f}s after the cut"
    assert server_s <= bound_s, f"the server noticed the dead path {server_s:.1f}s after the cut"
    assert attempts[0]["outcome"] in ("disconnected", "lease_expired"), (
        f"the dead stream's lease was not handed back: {harness.attempt_history(attempts)}"
    )
    assert logged(agent, "deliveries_abandoned"), "the agent kept working for a dead stream"
    lease_1 = f"{attempts[0]['delivery_id']}.1"
    assert not [e for e in logged(agent, "delivery_acked") if e.get("lease_id") == lease_1], (
        "the agent ACKed the lease it held on the dead stream"
    )
    report.assert_sound(max_copies=2)
    twice = {load_id for load_id, copies in ledger.copies().items() if copies > 1}
    assert twice == {held.load_id}, (
        f"events delivered twice: {sorted(twice)}; only the one the sink held may come again"
    )


async def test_an_ack_written_into_a_blip_longer_than_the_lease_is_refused(
    relay: harness.Relay, agents
) -> None:
    relay.start(*server_keepalive(*BLIP_KEEPALIVE_S), "--lease-ms", str(BLIP_LEASE_MS))
    await relay.wait_ready()
    ledger, hold = Ledger(), HoldNext()
    async with Proxy(relay.grpc_address) as proxy, Sink(ledger, hold) as sink:
        blipped = agents(
            sink.url, *agent_keepalive(*BLIP_KEEPALIVE_S), name="blipped", server=proxy.address
        )
        await harness.wait_logged(blipped.log_text, harness.logged("connected"), 20, "a stream")
        held = await hold_one(relay, ledger, hold)
        received = await harness.wait_logged(
            blipped.log_text,
            harness.logged("delivery_received", event_id=held.event_id),
            5,
            "the lease",
        )
        lease_1 = received["lease_id"]

        cut_at = time.time()
        proxy.cut()
        agents(sink.url, name="standby")  # dials the server directly
        await harness.wait_logged(
            relay.log_text, harness.logged("lease_expired", lease_id=lease_1), 20, "expiry"
        )
        hold.release()  # the destination answers; the agent ACKs into the blip
        await harness.wait_logged(
            blipped.log_text, harness.logged("delivery_acked", lease_id=lease_1), 10, "the ACK"
        )
        blip_s = time.time() - cut_at
        proxy.heal()
        await harness.wait_logged(
            relay.log_text,
            lambda e: e.get("event") == "lease_lost" and lease_1 in e.get("lease_ids", []),
            20,
            "the server to refuse the late ACK",
        )
        await harness.wait_logged(
            blipped.log_text,
            harness.logged("lease_lost", lease_id=lease_1),
            10,
            "the agent to hear of it",
        )
        await harness.wait_deliveries(relay, all_delivered, 30, "a later attempt's ACK")
        attempts = await harness.assert_delivered_once(relay, held.event_id)
        broken = logged(blipped, "disconnected")  # before the proxy closes, at the end

    sink_got = [a.attempt for a in ledger.arrivals if a.load_id == held.load_id]
    print(
        f"\nblip {blip_s:.1f}s (lease {BLIP_LEASE_MS} ms, keepalive {BLIP_KEEPALIVE_S[0]}s+"
        f"{BLIP_KEEPALIVE_S[1]}s); the ACK of {lease_1} arrived after it and was refused\n"
        f"attempts: {harness.attempt_history(attempts)}; the sink got attempts {sink_got}"
    )
    assert not broken, "the connection did not survive the blip: the late ACK never got through"
    assert attempts[0]["outcome"] == "lease_expired", harness.attempt_history(attempts)
    assert len(attempts) > 1, "the ACK of the expired lease settled the event"
    assert len(sink_got) == len(set(sink_got)), f"an attempt reached the sink twice: {sink_got}"
    ledger.report().assert_sound()
