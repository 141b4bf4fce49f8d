"""Fault 7: a slow destination under steady ingest: the backlog waits on disk, not in RAM.

The sink finishes about one event per second (each request takes SINK_DELAY_S, the agent
runs CAP of them at a time) while webhooks arrive at RATE per second for SECONDS. Every
webhook must still be answered 2xx, the agent must never have more than CAP requests open
at the sink, and the events it has not reached yet must be pending rows in the database.

Memory: each event carries a PAYLOAD_BYTES body. Between the early RSS sample (after
EARLY events) and the one at the end of the load, the backlog grows by COUNT - EARLY
events, about 40 MB of bodies alone (more as Python objects, and twice if kept both sealed
and open). RSS_MARGIN_KIB is well under that and well over what caches and allocator
noise add (SQLite's page cache is 2 MiB per connection), so a process that kept the
backlog in memory fails and one that streams it from the database passes.
"""

from __future__ import annotations

import asyncio
import pathlib
import time

import pytest
from aiohttp import web

from tests.acceptance import harness
from tests.faults.ledger import Arrival, Ledger, Sink

RATE = 400  # webhooks per second (a fifth of what this 2-CPU VM ingests at its slowest)
SECONDS = 30
COUNT = RATE * SECONDS  # 12,000
EARLY = RATE * 5  # the first RSS sample, 5 s into the load
PAYLOAD_BYTES = 4096
CAP = 4  # the agent's --max-in-flight
SINK_DELAY_S = 4.0  # CAP requests at a time, 4 s each: about one event per second
AGENT_TIMEOUT_S = 15  # above the sink's delay: slowness is not failure here
RSS_MARGIN_KIB = 16 * 1024  # vs ~40,000 KiB of bodies for the backlog's growth
DRAIN_CAP = 64
DRAIN_TIMEOUT_S = 60  # ~20 s on an idle 2-core machine


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), in KiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Memory:
    """RSS samples of the server and the agent, by load progress."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: dict[str, dict[str, int]] = {}

    def sample(self, label: str) -> None:
        self.samples[label] = {name: rss_kib(pid) for name, pid in self.pids.items()}

    def growth_kib(self, name: str) -> int:
        return self.samples["end"][name] - self.samples["early"][name]

    def text(self) -> str:
        return "\n".join(
            f"RSS {name}: "
            + ", ".join(f"{label} {kib / 1024:.1f} MiB" for label, kib in self.kib(name))
            + f"; growth {self.growth_kib(name) / 1024:+.1f} MiB"
            for name in self.pids
        )

    def kib(self, name: str) -> list[tuple[str, int]]:
        return [(label, values[name]) for label, values in self.samples.items()]


@pytest.mark.timeout(200)
async def test_a_slow_sink_under_steady_ingest_keeps_the_backlog_in_the_database(
    relay: harness.Relay, agents
) -> None:
    relay.start()
    await relay.wait_ready()
    ledger = Ledger(payload_bytes=PAYLOAD_BYTES)
    slow = True

    async def one_per_second(_arrival: Arrival, _request: web.Request) -> None:
        if slow:
            await asyncio.sleep(SINK_DELAY_S)

    async with Sink(ledger, one_per_second) as sink:
        agent = agents(sink.url, "--max-in-flight", str(CAP), "--timeout", str(AGENT_TIMEOUT_S))
        assert relay.proc is not None
        memory = Memory({"server": relay.proc.pid, "agent": agent.proc.pid})

        async def early_sample(answered: int) -> None:
            if answered == EARLY:
                memory.sample("early")

        started = time.monotonic()
        await ledger.load(relay.input_url(), COUNT, rate=RATE, concurrency=16, on_sent=early_sample)
        load_s = time.monotonic() - started
        memory.sample("end")
        in_flight_max = sink.max_in_flight
        arrived = len(ledger.delivered_ids())
        status = await relay.cli_json("status")

        slow = False
        agents(sink.url, "--max-in-flight", str(DRAIN_CAP), name="drain")
        started = time.monotonic()
        await ledger.wait_delivered(DRAIN_TIMEOUT_S)
        drain_s = time.monotonic() - started

    states = status["deliveries"]
    report = ledger.report(
        settings={"sqlite_synchronous": "FULL (default)", "lease_ms": "3000", "agent_cap": str(CAP)}
    )
    print(
        f"\nload: {COUNT} webhooks of {PAYLOAD_BYTES} B in {load_s:.1f} s; "
        f"delivered by then {arrived}; deliveries by state {states}\n"
        f"sink in flight at most {in_flight_max} (agent cap {CAP})\n"
        f"{memory.text()} (margin {RSS_MARGIN_KIB / 1024:.0f} MiB)\n"
        f"drain with a fast sink and a {DRAIN_CAP}-slot agent: {drain_s:.1f} s\n"
        f"{report.text()}"
    )
    assert report.answered_2xx == COUNT, "a webhook was refused while the destination was slow"
    assert in_flight_max <= CAP, f"the agent had {in_flight_max} requests open, cap {CAP}"
    assert in_flight_max == CAP, "the sink never saw the agent's full concurrency: no backlog"
    assert sum(states.values()) == COUNT and states["dead"] == 0
    assert states["leased"] <= CAP, f"{states['leased']} leases for an agent of {CAP} slots"
    assert states["pending"] >= COUNT - arrived - CAP, (
        f"only {states['pending']} pending deliveries for {COUNT - arrived} events not "
        "yet at the sink: the backlog is not in the database"
    )
    for name in ("server", "agent"):
        assert memory.growth_kib(name) < RSS_MARGIN_KIB, (
            f"the {name}'s memory grew {memory.growth_kib(name) / 1024:.1f} MiB while the "
            f"backlog grew by {COUNT - EARLY} events: it holds the backlog in memory"
        )
    report.assert_sound(max_copies=1)
