"""How big each workload is (full run or --quick), and what a scenario gets to work with."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

from bench import relay


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    ingest_s: float  # durable ingest and bare: seconds of 1 KiB POSTs at 64 connections
    latency_s: float  # end-to-end and direct: seconds at 20 % of the ingest rate
    window_s: float  # grpc-window baseline
    drain_events: int  # queued before the agent starts
    fanout_events: int  # each to 10 outputs
    backlogs: tuple[int, ...]  # pending deliveries at which a lease is timed
    large_s: float  # 10 MiB bodies at 4 connections
    streams_per_bucket: int  # agent streams on each of the 10 buckets (one process)
    many_events: int  # spread over those streams, at most
    many_s: float  # ... sent within this, and delivered within as long again
    standard: tuple[str, ...]  # bench.load arguments for the standard workloads


FULL = Sizes(
    ingest_s=20,
    latency_s=10,
    window_s=5,
    drain_events=100_000,
    fanout_events=5_000,
    backlogs=(10_000, 100_000, 1_000_000),
    large_s=10,
    streams_per_bucket=100,
    many_events=50_000,
    many_s=60,
    standard=(),
)

QUICK = Sizes(
    ingest_s=3,
    latency_s=3,
    window_s=2,
    drain_events=5_000,
    fanout_events=500,
    backlogs=(10_000, 100_000),
    large_s=3,
    streams_per_bucket=20,
    many_events=10_000,
    many_s=10,
    standard=("--requests", "200", "--outage-events", "50", "--seconds", "2"),
)


@dataclass(kw_only=True)
class Run:
    """What every scenario shares: the template, the folder, and figures others measured."""

    engine: str
    quick: bool
    sizes: Sizes
    folder: pathlib.Path
    template: relay.Template
    databases: relay.Databases
    measured: dict[str, float] = field(default_factory=dict)  # e.g. "ingest_rate"
    notes: list[str] = field(default_factory=list)  # printed under the table

    async def installation(self, name: str) -> relay.Installation:
        return await relay.Installation.copy(self.template, self.folder / name, self.databases)

    def scratch(self, name: str) -> pathlib.Path:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def count(n: int) -> str:
    """10000 -> '10k', 1000000 -> '1M'."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)
