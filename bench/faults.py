"""The long run of fault 1: SIGKILL relay-server again and again under load, lose nothing.

    python -m bench.faults [--events 10000] [--kills 20] [--seed N] [--json]

The scenario of tests/faults/test_kills.py::test_server_sigkill_under_load at a larger
scale, with real processes on loopback in a temporary folder: one relay-agent forwards to
a recording sink, the load generator posts `--events` webhooks, and the server is killed
`--kills` times at seeded random moments and restarted on the same ports. It prints the
ledger's report (sent, answered, lost, corrupted, duplicates against their bound,
latency, recovery after each kill), the durability settings in force and the wall time,
and exits 1 if a check of the test fails. Every loop is bounded by the event count and
by timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import tempfile
from typing import Any

from tests.acceptance import harness
from tests.faults import test_kills

SETTLE_TIMEOUT_S = 600  # after the load: every accepted webhook delivered, nothing open


async def run(events: int, kills: int, seed: int) -> test_kills.KillRun:
    with tempfile.TemporaryDirectory() as tmp:
        relay = harness.Relay(home=pathlib.Path(tmp))
        await relay.setup()
        agents: list[harness.Agent] = []

        def start_agent(*args: str) -> harness.Agent:
            agents.append(harness.start_agent(relay, *args))
            return agents[-1]

        try:
            return await test_kills.run_server_kills(
                relay,
                start_agent,
                events=events,
                kills=kills,
                seed=seed,
                settle_timeout=SETTLE_TIMEOUT_S,
            )
        finally:
            for agent in agents:
                if agent.proc.poll() is None:
                    agent.kill()
            relay.stop()


def verdict(result: test_kills.KillRun) -> str | None:
    """None if every check of the test holds, else what failed."""
    try:
        test_kills.assert_nothing_stored_is_lost(result)
    except AssertionError as failed:
        return str(failed)
    return None


def as_json(result: test_kills.KillRun, failure: str | None) -> dict[str, Any]:
    return {
        **result.report.as_dict(),
        "stored": len(result.stored),
        "stored_unanswered_delivered": result.stored_unanswered(),
        "bounds": {
            "max_copies": result.max_copies_bound,
            "duplicates": result.duplicates_bound,
        },
        "seed": result.seed,
        "wall_s": round(result.wall_s, 1),
        "cpus": os.cpu_count(),
        "failure": failure,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    options = parser.parse_args()
    if not 0 < options.events <= test_kills.EVENT_LIST_MAX:
        parser.error(f"--events must be within 1..{test_kills.EVENT_LIST_MAX} (event list)")
    if not 0 <= options.kills <= options.events * 9 // 10:
        parser.error("--kills must be within 0..90% of --events")
    seed = test_kills.seed_from_env() if options.seed is None else options.seed
    result = asyncio.run(run(options.events, options.kills, seed))
    failure = verdict(result)
    if options.json:
        print(json.dumps(as_json(result, failure), indent=2))
    else:
        print(test_kills.describe(result))
        print(f"{os.cpu_count()} CPUs; " + (f"FAILED: {failure}" if failure else "all checks hold"))
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
