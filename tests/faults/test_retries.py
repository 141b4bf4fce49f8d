"""Fault 5: a destination that fails for a while, or for good, with real processes.

The server retries a failed delivery after a delay with full jitter: after failed attempt
n it waits a time drawn uniformly from [0, min(cap, initial * 2 ** (n - 1))]. The lower
bound is 0, so only the ceiling can be checked: each gap between two arrivals at the sink
must stay under the ceiling plus SLACK_S, the time the retry takes on top of its delay
(the NACK's trip and commit, up to one poll interval before the due retry is noticed,
the lease push and the forward). The schedule is written out here, not imported from
relay_server/retry.py, so a change in the implementation shows up as a failure.

A bucket with --max-attempts 3 turns the third failure into a DEAD delivery that the
dead-letter queue shows with its last error; `dlq replay` then delivers it exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import ClientSession, web

from tests.acceptance import harness
from tests.faults.ledger import Arrival, Ledger, Sink

INITIAL_MS = 200
CAP_MS = 2000
# Given after harness.FAST_RETRIES (200ms..1s): click keeps the last value of an option.
BACKOFF = ("--retry-initial", f"{INITIAL_MS}ms", "--retry-cap", f"{CAP_MS}ms")
SLACK_S = 0.5  # poll interval (100 ms) + NACK commit + lease push + forward, on a busy CI
FAILURES = 5  # ceilings 0.2, 0.4, 0.8, 1.6 and 2.0 s: the last one is the cap
RETRY_AFTER_S = 2  # above the first ceiling (0.2 s), not above the cap: the server caps it
MAX_ATTEMPTS = 3


def ceiling_s(failures: int) -> float:
    """The longest delay the schedule allows after `failures` failed attempts."""
    return min(CAP_MS, INITIAL_MS * 2.0 ** (failures - 1)) / 1000


def gaps_within_schedule(arrivals: list[Arrival]) -> list[str]:
    """Print each gap next to its bound; return the gaps that broke it."""
    broken = []
    print(f"\n{'retry':>5} {'gap s':>7} {'bound s':>8}  (ceiling + {SLACK_S} s slack)")
    for n, (before, after) in enumerate(itertools.pairwise(arrivals), start=1):
        gap, bound = after.at - before.at, ceiling_s(n) + SLACK_S
        print(f"{n:>5} {gap:>7.3f} {bound:>8.3f}")
        if gap > bound:
            broken.append(f"retry {n} came {gap:.3f} s after attempt {n}, bound {bound:.3f} s")
    return broken


async def eventually(fetch: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll `fetch` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (found := await fetch()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)
    return found


async def delivered(relay: harness.Relay, event_id: str) -> bool:
    """Has a delivery of the event been ACKed? (a replay adds one; the dead one stays)"""
    (event,) = [e for e in await relay.cli_json("event", "list") if e["id"] == event_id]
    return any(d["state"] == "delivered" for d in event["deliveries"])


async def post_one(ledger: Ledger, url: str) -> None:
    async with ClientSession() as session:
        sent = await ledger.post(session, url, 0)
    assert sent.status == 200, f"the relay answered {sent.status} to a webhook"


async def test_a_failing_sink_gets_the_event_on_attempt_k_plus_1_within_the_backoff_schedule(
    relay: harness.Relay, agents
) -> None:
    relay.start(*BACKOFF)
    await relay.wait_ready()
    ledger = Ledger()

    async def fail_k_times(_arrival: Arrival, _request: web.Request) -> web.Response | None:
        return web.Response(status=500) if len(ledger.arrivals) <= FAILURES else None

    async with Sink(ledger, fail_k_times) as sink:
        agents(sink.url)
        await post_one(ledger, relay.input_url())
        await harness.wait_until(
            lambda: len(ledger.arrivals) > FAILURES, 30, f"attempt {FAILURES + 1} at the sink"
        )
        event_id = ledger.arrivals[0].event_id
        await eventually(lambda: delivered(relay, event_id), 10, "the ACK to be recorded")
    arrivals = ledger.arrivals
    broken = gaps_within_schedule(arrivals)
    report = ledger.report(settings={"retry": f"{INITIAL_MS}ms..{CAP_MS}ms, full jitter"})
    print(report.text())
    assert [a.attempt for a in arrivals] == [str(n) for n in range(1, FAILURES + 2)], (
        "the sink should see attempts 1..K+1 of one delivery, then nothing"
    )
    assert {a.event_id for a in arrivals} == {event_id}
    assert not broken, "a retry came later than the backoff schedule allows: " + "; ".join(broken)
    report.assert_sound(max_copies=FAILURES + 1)


async def test_a_retry_after_answer_delays_the_next_attempt_by_that_long(
    relay: harness.Relay, agents
) -> None:
    relay.start(*BACKOFF)
    await relay.wait_ready()
    ledger = Ledger()

    async def busy_once(_arrival: Arrival, _request: web.Request) -> web.Response | None:
        if len(ledger.arrivals) == 1:
            return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return None

    async with Sink(ledger, busy_once) as sink:
        agents(sink.url)
        await post_one(ledger, relay.input_url())
        await harness.wait_until(lambda: len(ledger.arrivals) == 2, 30, "the retry at the sink")
    first, second = ledger.arrivals
    gap = second.at - first.at
    print(f"\nRetry-After: {RETRY_AFTER_S} -> next attempt {gap:.3f} s later")
    assert gap >= RETRY_AFTER_S, (
        f"the sink asked for {RETRY_AFTER_S} s with Retry-After but was retried "
        f"after {gap:.3f} s (the plain backoff would allow {ceiling_s(1)} s)"
    )
    assert gap <= RETRY_AFTER_S + SLACK_S, f"retried {gap:.3f} s later, not {RETRY_AFTER_S} s"
    ledger.report().assert_sound(max_copies=2)


async def test_an_always_failing_sink_goes_dead_after_max_attempts_and_replay_delivers_once(
    relay: harness.Relay, agents
) -> None:
    relay.start(*BACKOFF)
    await relay.wait_ready()
    await relay.cli("bucket", "create", "flaky", "--max-attempts", str(MAX_ATTEMPTS))
    made_input, made_token = await asyncio.gather(
        relay.cli_json("input", "create", "--bucket", "flaky"),
        relay.cli_json("token", "create", "--bucket", "flaky"),
    )
    ledger = Ledger()
    healthy = False
    replay_headers: list[str | None] = []

    async def fail_until_healthy(_arrival: Arrival, request: web.Request) -> web.Response | None:
        replay_headers.append(request.headers.get("X-Stowhook-Replay"))
        return None if healthy else web.Response(status=500)

    async def dead() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await relay.cli_json("dlq", "list")
        return found

    async with Sink(ledger, fail_until_healthy) as sink:
        agents(sink.url, bucket="flaky", token=made_token["token"])
        await post_one(ledger, relay.input_url(made_input["id"]))
        await harness.wait_until(lambda: len(ledger.arrivals) >= MAX_ATTEMPTS, 30, "3 attempts")
        (entry,) = await eventually(dead, 30, "the delivery to go DEAD")
        arrived = len(ledger.arrivals)
        event_id = ledger.arrivals[0].event_id
        assert entry["id"] == event_id
        (delivery,) = entry["deliveries"]
        assert (delivery["state"], delivery["attempts"]) == ("dead", MAX_ATTEMPTS)
        assert delivery["last_error"] == "nack: HTTP 500", "the DLQ shows why it died"

        healthy = True
        replayed = await relay.cli_json("dlq", "replay", event_id)
        assert replayed["count"] == 1
        await harness.wait_until(lambda: len(ledger.arrivals) > arrived, 30, "the replay")
        await eventually(lambda: delivered(relay, event_id), 10, "the replay's ACK")
        left = await dead()
    broken = gaps_within_schedule(ledger.arrivals[:arrived])
    print(f"arrivals: {arrived} before DEAD, {len(ledger.arrivals)} in all; DLQ after: {left}")
    assert arrived == MAX_ATTEMPTS, f"{arrived} attempts for a bucket of --max-attempts 3"
    assert not broken, "; ".join(broken)
    assert len(ledger.arrivals) == MAX_ATTEMPTS + 1, "the replay should deliver exactly once"
    replay = ledger.arrivals[-1]
    assert (replay.event_id, replay.attempt) == (event_id, "1"), "a fresh delivery, attempt 1"
    assert replay_headers == [None] * MAX_ATTEMPTS + ["1"], (
        "only the replayed arrival should carry X-Stowhook-Replay: 1"
    )
    assert left == [], "the replayed event is still in the dead-letter queue"
    ledger.report().assert_sound(max_copies=MAX_ATTEMPTS + 1)
