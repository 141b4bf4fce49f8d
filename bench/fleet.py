"""Many agent streams in one process: one SDK `Consumer` per stream, each ACKs at once.

    STOWHOOK_TOKEN=... python -m bench.fleet --server HOST:PORT --bucket B [--bucket B2 ...]
        [--per-bucket 100] [--max-in-flight 1] [--timeout 300]

It opens `--per-bucket` streams on each bucket (relay_agent.Consumer, as any SDK worker
would) and prints {"connected": n, "seconds": s} once every stream has its Welcome (or
the timeout passed). It then reads `expect N [SECONDS]` on stdin and consumes until N
distinct events have arrived (or SECONDS, or the timeout), and prints one JSON line:
delivered (distinct events), duplicated (arrivals beyond the first), lost_leases,
per_bucket (deliveries per stream, in stream order) and the seconds from the first
arrival to the last. Then it closes every stream and exits. Loopback only; bounded by
--timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import relay_agent
from bench import procs
from relay_agent import logging as agent_logging

LINGER_S = 0.5  # after the last expected event: time for a duplicate to show up


@dataclass
class Tally:
    per_stream: dict[tuple[str, int], int] = field(default_factory=dict)
    copies: collections.Counter[str] = field(default_factory=collections.Counter)
    lost_leases: int = 0
    first: float = 0.0
    last: float = 0.0
    expect: int | None = None
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, stream: tuple[str, int], event_id: str) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.last = now
        self.per_stream[stream] = self.per_stream.get(stream, 0) + 1
        self.copies[event_id] += 1
        if self.expect is not None and len(self.copies) >= self.expect:
            self.enough.set()

    def report(self) -> dict[str, object]:
        per_bucket: dict[str, list[int]] = {}
        for (bucket, _), count in sorted(self.per_stream.items()):
            per_bucket.setdefault(bucket, []).append(count)
        return {
            "delivered": len(self.copies),
            "duplicated": sum(n - 1 for n in self.copies.values()),
            "lost_leases": self.lost_leases,
            "per_bucket": per_bucket,
            "seconds": round(self.last - self.first, 4),
        }


async def consume(consumer: relay_agent.Consumer, stream: tuple[str, int], tally: Tally) -> None:
    async for event in consumer:
        tally.record(stream, event.id)
        try:
            await event.ack()
        except relay_agent.LeaseLost:
            tally.lost_leases += 1


async def read_expect() -> tuple[int, float]:
    """`expect N [SECONDS]` from stdin: N events, within SECONDS (default: no limit)."""
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    words = line.split()
    try:
        if words[0] != "expect":
            raise ValueError(words[0])
        return int(words[1]), float(words[2]) if len(words) > 2 else float("inf")
    except (IndexError, ValueError):
        raise SystemExit(f"bench.fleet: expected 'expect N [SECONDS]', got {line!r}") from None


async def run(options: argparse.Namespace) -> None:
    token = os.environ["STOWHOOK_TOKEN"]
    streams = [(bucket, n) for bucket in options.bucket for n in range(options.per_bucket)]
    consumers = {
        stream: relay_agent.Consumer(
            relay_agent.AgentSettings(
                server=options.server,
                token=token,
                buckets=(stream[0],),
                max_in_flight=options.max_in_flight,
                agent_name=f"fleet-{stream[0]}-{stream[1]}",
                insecure=True,
            )
        )
        for stream in streams
    }
    tally = Tally(per_stream=dict.fromkeys(streams, 0))
    deadline = time.monotonic() + options.timeout
    started = time.monotonic()
    for consumer in consumers.values():
        consumer.start()
    workers = [
        asyncio.create_task(consume(consumer, stream, tally), name=f"fleet-{stream}")
        for stream, consumer in consumers.items()
    ]
    try:
        connected = await connect_all(list(consumers.values()), deadline)
        print(
            json.dumps({"connected": connected, "seconds": time.monotonic() - started}), flush=True
        )
        expect, within = await asyncio.wait_for(
            read_expect(), max(1.0, deadline - time.monotonic())
        )
        tally.expect = expect
        if len(tally.copies) >= expect:
            tally.enough.set()
        wait = min(within, deadline - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.enough.wait(), max(1.0, wait))
        await asyncio.sleep(LINGER_S)
        print(json.dumps({"expected": tally.expect, **tally.report()}), flush=True)
    finally:
        await asyncio.gather(*(c.close() for c in consumers.values()), return_exceptions=True)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def connect_all(consumers: list[relay_agent.Consumer], deadline: float) -> int:
    """How many streams got their Welcome before `deadline`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(c.wait_connected() for c in consumers)),
            max(1.0, deadline - time.monotonic()),
        )
    return sum(c.connected for c in consumers)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--server", required=True)
    parser.add_argument("--bucket", action="append", required=True)
    parser.add_argument("--per-bucket", type=int, default=100)
    parser.add_argument("--max-in-flight", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    options = parser.parse_args()
    agent_logging.configure("json", "warning")
    procs.run_fast(run(options))


if __name__ == "__main__":
    main()
