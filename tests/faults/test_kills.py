"""Faults 1 and 2: SIGKILL of relay-server under load, and of relay-agent mid-delivery.

A killed process writes nothing more, so only what was committed before the kill counts.
What a user relies on, and these tests check:

* every webhook answered 2xx is delivered, whatever was killed and when;
* a webhook that got no answer (connection refused or reset) was either stored, and then
  delivered like any other, or never stored: nothing stored is left behind;
* duplicates happen only where at-least-once allows them, within a stated bound.

Fault 1 kills the server 5 times during 2,000 webhooks; `python -m bench.faults` runs the
same scenario (imported from here) with 20 kills over 10,000. Fault 2 kills the agent
while the sink holds an event it has not answered yet (it must come again, once), and
while the agent holds leased events that never reached the sink (they must come once).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.acceptance import harness
from tests.faults.ledger import Arrival, Ledger, Report, Sink

SEED_ENV = "FAULT_SEED"  # set it to replay the kill moments of a failed run
EVENTS = 2000
KILLS = 5
LOAD_CONCURRENCY = 8
AGENT_MAX_IN_FLIGHT = 8
EVENT_LIST_MAX = 10000  # `relay-server event list --limit` accepts no more


def seed_from_env() -> int:
    return int(os.environ.get(SEED_ENV) or random.randrange(2**32))


def kill_points(seed: int, events: int, kills: int) -> list[int]:
    """Webhook counts (sent and answered, or not) after which the server dies: random,
    none in the first or last 5%, so the load runs before the first kill and after the
    last restart."""
    margin = max(1, events // 20)
    return sorted(random.Random(seed).sample(range(margin, events - margin), kills))


def serve_settings() -> dict[str, str]:
    """The durability and retry settings every restart runs with (harness.Relay.start)."""
    flags = dict(zip(harness.FAST_RETRIES[::2], harness.FAST_RETRIES[1::2], strict=True))
    return {
        "sqlite_synchronous": "FULL (the default: no --sqlite-synchronous flag)",
        "lease_ms": flags["--lease-ms"],
        "retry": f"{flags['--retry-initial']}..{flags['--retry-cap']} full jitter",
        "poll": flags["--poll-interval"],
    }


class ServerKiller:
    """SIGKILLs relay-server after the given webhook counts and restarts it on its ports.

    While it is down the senders wait (as a webhook provider retrying later would), so the
    load spans every kill instead of being spent on refused connections; the requests in
    flight at the kill get no answer. The agent is left alone: it reconnects by itself.
    """

    def __init__(self, relay: harness.Relay, at: list[int]) -> None:
        self.relay = relay
        self._due = list(at)
        self._up = asyncio.Event()
        self._up.set()
        # Webhooks cut off by one kill may reach the next kill's count: it waits its turn.
        self._one_at_a_time = asyncio.Lock()
        self.restarted_at: list[float] = []

    async def on_sent(self, done: int) -> None:
        if self._due and done >= self._due[0]:
            self._due.pop(0)
            async with self._one_at_a_time:
                await self._kill_and_restart()
        await self._up.wait()

    async def _kill_and_restart(self) -> None:
        self._up.clear()
        try:
            status = self.relay.kill(signal.SIGKILL)
            assert status == -signal.SIGKILL, f"relay-server exited {status} before the kill"
            self.relay.start()
            self.restarted_at.append(time.monotonic())
            await self.relay.wait_ready(timeout=60)
        finally:
            self._up.set()  # a failed restart must not leave the other senders waiting

    def recovery_ms(self, ledger: Ledger) -> list[float]:
        """For each restart, the time until a webhook sent after it was answered 2xx.

        (Answers the old process gave just before it died may be read after the restart.)
        """
        recovered = []
        for restart in self.restarted_at:
            after = [s.answered for s in ledger.accepted() if s.started > restart and s.answered]
            if after:
                recovered.append((min(after) - restart) * 1000)
        return recovered


async def settled_deliveries(relay: harness.Relay, timeout: float) -> dict[str, dict[str, Any]]:
    """Event id -> its delivery, once no delivery is pending or leased any more."""
    deadline = time.monotonic() + timeout
    while True:
        events = await relay.cli_json("event", "list", "--limit", str(EVENT_LIST_MAX))
        states = {event["id"]: event["deliveries"][0] for event in events}
        if all(d["state"] not in ("pending", "leased") for d in states.values()):
            return states
        if time.monotonic() > deadline:
            return states  # the caller's assertions say what is still open
        await asyncio.sleep(0.5)


@dataclass
class KillRun:
    seed: int
    kills: int
    report: Report
    stored: dict[str, dict[str, Any]]  # event id -> its delivery, as `event list` shows it
    ledger: Ledger
    wall_s: float

    @property
    def max_copies_bound(self) -> int:
        return 1 + self.kills

    @property
    def duplicates_bound(self) -> int:
        return self.kills * AGENT_MAX_IN_FLIGHT

    def stored_unanswered(self) -> int:
        """Webhooks the relay stored and delivered although their sender got no answer."""
        delivered = self.ledger.delivered_ids()
        return sum(
            1 for s in self.ledger.sent.values() if s.status is None and s.load_id in delivered
        )


async def run_server_kills(
    relay: harness.Relay,
    start_agent: Callable[..., harness.Agent],
    *,
    events: int,
    kills: int,
    seed: int,
    settle_timeout: float,
) -> KillRun:
    """Fault 1: load `events` webhooks, SIGKILL the server `kills` times, let it all settle.

    `relay` is set up and not running; `start_agent(forward, *flags)` starts a relay-agent.
    """
    started = time.monotonic()
    relay.start()
    await relay.wait_ready()
    ledger = Ledger()
    killer = ServerKiller(relay, kill_points(seed, events, kills))
    async with Sink(ledger) as sink:
        start_agent(sink.url, "--max-in-flight", str(AGENT_MAX_IN_FLIGHT))
        await ledger.load(
            relay.input_url(), events, concurrency=LOAD_CONCURRENCY, on_sent=killer.on_sent
        )
        await ledger.wait_delivered(settle_timeout)
        stored = await settled_deliveries(relay, settle_timeout)
    report = ledger.report(
        recovery_ms=killer.recovery_ms(ledger),
        settings={
            **serve_settings(),
            "agent_max_in_flight": str(AGENT_MAX_IN_FLIGHT),
            "load_concurrency": str(LOAD_CONCURRENCY),
            "kills": str(len(killer.restarted_at)),
            "seed": str(seed),
        },
    )
    return KillRun(
        seed=seed,
        kills=len(killer.restarted_at),
        report=report,
        stored=stored,
        ledger=ledger,
        wall_s=time.monotonic() - started,
    )


def assert_nothing_stored_is_lost(run: KillRun) -> None:
    """The checks of fault 1, shared with bench/faults.py (which prints them on failure)."""
    report, text = run.report, run.report.text()
    # At-least-once: a delivery gets a second copy only if its ACK was not committed when
    # the server died, i.e. it was leased to the agent at that moment (the server frees an
    # agent's credit only after the ACK's commit, so uncommitted ACKs still count against
    # it). The agent holds at most AGENT_MAX_IN_FLIGHT leases, so each kill adds at most
    # that many copies, and at most one more copy of any one event.
    report.assert_sound(max_copies=run.max_copies_bound)
    assert report.duplicates <= run.duplicates_bound, (
        f"{report.duplicates} duplicate deliveries, more than {run.kills} kills x "
        f"{AGENT_MAX_IN_FLIGHT} leases in flight:\n{text}"
    )
    assert len(report.recovery_ms) == run.kills, (
        f"the relay answered 2xx again after only {len(report.recovery_ms)} of "
        f"{run.kills} restarts:\n{text}"
    )
    delivered_events = {a.event_id for a in run.ledger.arrivals}
    not_delivered = sorted(set(run.stored) - delivered_events)
    assert not not_delivered, (
        f"{len(not_delivered)} stored events never reached the sink, e.g. "
        f"{not_delivered[:3]}:\n{text}"
    )
    open_states = {i: d["state"] for i, d in run.stored.items() if d["state"] != "delivered"}
    assert not open_states, f"stored events not DELIVERED in the end: {open_states}\n{text}"
    refused = {
        s.load_id
        for s in run.ledger.sent.values()
        if s.status is not None and not 200 <= s.status < 300
    }
    assert not refused & run.ledger.delivered_ids(), (
        f"a webhook answered with an error was stored and delivered:\n{text}"
    )
    events_per_webhook: dict[str, set[str]] = {}
    for a in run.ledger.arrivals:
        events_per_webhook.setdefault(a.load_id, set()).add(a.event_id)
    assert all(len(ids) == 1 for ids in events_per_webhook.values()), (
        f"one webhook was stored as several events:\n{text}"
    )
    assert report.answered_2xx <= len(run.stored) <= report.answered_2xx + report.no_answer, (
        f"{len(run.stored)} events stored for {report.answered_2xx} answered 2xx and "
        f"{report.no_answer} unanswered webhooks:\n{text}"
    )


def describe(run: KillRun) -> str:
    return (
        f"{run.report.text()}\n"
        f"stored {len(run.stored)} events, {run.stored_unanswered()} of them unanswered "
        f"(connection reset by the kill) and delivered all the same\n"
        f"bounds: max copies <= {run.max_copies_bound}, duplicates <= {run.duplicates_bound}\n"
        f"seed {run.seed} ({SEED_ENV}={run.seed} replays the kill moments); "
        f"wall time {run.wall_s:.1f} s"
    )


async def test_server_sigkill_under_load(
    relay: harness.Relay, agents: Callable[..., harness.Agent]
) -> None:
    seed = seed_from_env()
    print(f"\nseed {seed}")
    run = await run_server_kills(
        relay, agents, events=EVENTS, kills=KILLS, seed=seed, settle_timeout=60
    )
    print(describe(run))
    assert run.kills == KILLS, f"{run.kills} kills happened, not {KILLS}"
    assert_nothing_stored_is_lost(run)


# ---- fault 2: the agent dies -------------------------------------------------------------

SMALL_LOAD = 50
LEASED_AT_KILL = 4  # the agent's max in flight in the before-forwarding test


async def load_small(ledger: Ledger, relay: harness.Relay) -> None:
    await ledger.load(relay.input_url(), SMALL_LOAD, concurrency=4)
    report = ledger.report()
    assert report.answered_2xx == SMALL_LOAD, f"the relay refused webhooks:\n{report.text()}"


async def wait_leased(relay: harness.Relay, count: int) -> set[str]:
    """The ids of `count` events leased at once (polled through the CLI)."""
    leased: set[str] = set()

    async def poll() -> None:
        nonlocal leased
        listed = await relay.cli_json("event", "list", "--state", "leased")
        leased = {event["id"] for event in listed}

    deadline = time.monotonic() + 30
    await poll()
    while len(leased) < count:
        assert time.monotonic() < deadline, f"{len(leased)} events leased, not {count}"
        await asyncio.sleep(0.2)
        await poll()
    return leased


async def test_agent_sigkill_after_the_sink_got_an_event_before_its_ack(
    running: harness.Relay, agents: Callable[..., harness.Agent]
) -> None:
    ledger = Ledger()
    held: list[Arrival] = []
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold_the_first(arrival: Arrival, request: web.Request) -> None:
        if not held:
            held.append(arrival)
            holding.set()
            await release.wait()

    async with Sink(ledger, hold_the_first) as sink:
        # One lease at a time: the held event is the only one the killed agent had.
        first = agents(sink.url, "--max-in-flight", "1", name="agent-1")
        await load_small(ledger, running)
        await asyncio.wait_for(holding.wait(), 30)
        first.kill(signal.SIGKILL)  # the sink has the event; the agent never sent its ACK
        killed_at = time.monotonic()
        release.set()  # the answer goes to a dead connection
        agents(sink.url, "--max-in-flight", "1", name="agent-2")
        held_id = held[0].load_id
        await harness.wait_until(
            lambda: ledger.copies()[held_id] >= 2, 60, "the held event to come again"
        )
        await ledger.wait_delivered(60)
        stored = await settled_deliveries(running, 60)
    again = [a for a in ledger.arrivals if a.load_id == held_id][1]
    report = ledger.report(recovery_ms=[(again.at - killed_at) * 1000], settings=serve_settings())
    print(f"\n{report.text()}\nredelivered {(again.at - killed_at) * 1000:.0f} ms after the kill")

    report.assert_sound(max_copies=2)
    assert ledger.copies()[held_id] == 2, "the event held at the kill was not delivered again"
    assert report.duplicates == 1, f"events other than the held one came twice:\n{report.text()}"
    assert (held[0].attempt, again.attempt) == ("1", "2"), (
        f"X-Stowhook-Attempt was {held[0].attempt} then {again.attempt}, not 1 then 2"
    )
    delivery = stored[held[0].event_id]
    assert (delivery["state"], delivery["attempts"]) == ("delivered", 2), (
        f"the held event ends {delivery['state']} after {delivery['attempts']} attempts"
    )
    assert all(d["state"] == "delivered" for d in stored.values()), stored


async def test_agent_sigkill_with_leased_events_not_yet_forwarded(
    running: harness.Relay, agents: Callable[..., harness.Agent]
) -> None:
    ledger = Ledger()
    # The first agent's destination takes TCP connections and never reads them: its
    # leased events stay in the agent's HTTP client and never reach a service.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        hole_url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        first = agents(hole_url, "--max-in-flight", str(LEASED_AT_KILL), name="agent-1")
        await load_small(ledger, running)
        leased = await wait_leased(running, LEASED_AT_KILL)
        first.kill(signal.SIGKILL)
        killed_at = time.monotonic()
    async with Sink(ledger) as sink:
        agents(sink.url, "--max-in-flight", str(LEASED_AT_KILL), name="agent-2")
        await ledger.wait_delivered(60)
        stored = await settled_deliveries(running, 60)
    first_at = {a.event_id: a.at for a in reversed(ledger.arrivals)}
    latencies = sorted((first_at[i] - killed_at) * 1000 for i in leased if i in first_at)
    report = ledger.report(recovery_ms=latencies, settings=serve_settings())
    print(
        f"\n{report.text()}\nthe {len(leased)} events leased at the kill arrived "
        f"{', '.join(f'{ms:.0f}' for ms in latencies)} ms after it"
    )

    report.assert_sound(max_copies=1)
    assert len(latencies) == len(leased), "an event leased by the killed agent never came"
    assert all(d["state"] == "delivered" for d in stored.values()), stored
    assert all(stored[i]["attempts"] == 2 for i in leased), (
        "the killed agent's leases were not counted as one failed attempt each",
        {i: stored[i] for i in leased},
    )
