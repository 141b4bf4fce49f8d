"""Several relay-server replicas on one PostgreSQL database (real processes, real database).

Each test gets a fresh database (tests/pg.py); the replicas share it and one key file.
Webhooks go round-robin over the replicas, agents connect to different ones, and the
attempts table is read back to check that no delivery was ever leased twice at once.
"""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientSession, web

from tests import pg
from tests.acceptance import harness
from tests.acceptance.test_delivery import post
from tests.faults.ledger import Ledger, Sink

pytestmark = pytest.mark.skipif(not pg.pg_available(), reason=pg.SKIP_REASON)


@dataclass
class Replica(harness.Relay):
    """A relay-server installation whose database is the shared PostgreSQL one."""

    database_url: str = ""

    @property
    def base_args(self) -> list[str]:
        args = super().base_args
        args[args.index("--database-url") + 1] = self.database_url
        return args


@dataclass
class Cluster:
    url: str  # the shared database (postgresql+asyncpg://...)
    replicas: list[Replica]

    def servers(self, *order: int) -> str:
        """The agent's --server value: these replicas' gRPC addresses, in this order."""
        return ",".join(self.replicas[i].grpc_address for i in order)

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(pg.url_for(pg.database_name(self.url), "postgresql"))
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()


@pytest.fixture
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """make(n, *serve_args): n replicas started on a fresh database (stopped afterwards)."""
    started: list[Replica] = []
    async with pg.fresh_database("replicas") as url:

        async def make(n: int, *serve_args: str) -> Cluster:
            replicas = [
                Replica(home=_home(tmp_path, f"replica{i}"), database_url=url) for i in range(n)
            ]
            await replicas[0].setup()  # quickstart: schema, key, bucket, input, token
            for replica in replicas[1:]:
                await replica.setup(template=replicas[0].home)  # the same key file
            for replica in replicas:
                replica.start(*serve_args)
                started.append(replica)
            await asyncio.gather(*(replica.wait_ready() for replica in replicas))
            return Cluster(url=url, replicas=replicas)

        try:
            yield make
        finally:
            for replica in started:
                replica.stop()


@pytest.fixture
def agents() -> Iterator[Callable[..., harness.Agent]]:
    """start(replica, forward, name, servers): relay-agent run (killed at the end)."""
    started: list[harness.Agent] = []

    def start(replica: Replica, forward: str, name: str, servers: str) -> harness.Agent:
        agent = harness.start_agent(replica, forward, name=name, server=servers)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.kill()


def _home(root: pathlib.Path, name: str) -> pathlib.Path:
    home = root / name
    home.mkdir()
    return home


async def post_spread(
    ledger: Ledger,
    url_for: Callable[[int], str],
    count: int,
    *,
    concurrency: int = 12,
    on_sent: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Post `count` ledger events, event n to `url_for(n)`, `concurrency` at a time."""
    next_seq = 0
    done = 0

    async def worker(session: ClientSession) -> None:
        nonlocal next_seq, done
        while next_seq < count:
            seq = next_seq
            next_seq += 1
            await ledger.post(session, url_for(seq), seq)
            done += 1
            if on_sent is not None:
                await on_sent(done)

    async with ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


async def attempts_by_delivery(cluster: Cluster) -> dict[str, list[asyncpg.Record]]:
    rows = await cluster.query(
        "SELECT delivery_id, attempt, outcome, agent, started_at, ended_at FROM attempts"
    )
    found: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        found.setdefault(row["delivery_id"], []).append(row)
    for history in found.values():
        history.sort(key=lambda row: row["attempt"])
    return found


# Timestamps come from different processes' clocks (one machine): a claim may read the
# clock a moment before the settlement it follows commits.
CLOCK_SLACK_MS = 10


def double_leases(attempts: dict[str, list[asyncpg.Record]]) -> list[str]:
    """Deliveries with two attempts whose [started_at, ended_at] overlap, where the earlier
    one did not end by its lease expiring."""
    found = []
    for delivery_id, history in attempts.items():
        numbers = [row["attempt"] for row in history]
        if len(set(numbers)) != len(numbers):
            found.append(f"{delivery_id}: attempt numbers repeat {numbers}")
        for earlier, later in itertools.pairwise(history):
            if earlier["outcome"] == "lease_expired":
                continue
            if later["started_at"] < earlier["ended_at"] - CLOCK_SLACK_MS:
                found.append(f"{delivery_id}: {dict(earlier)} overlaps {dict(later)}")
    return found


async def event_deliveries(
    cluster: Cluster, settle_timeout: float = 30
) -> dict[str, tuple[str, str]]:
    """Event id -> (delivery id, state), once none is pending or leased any more.

    The sink can have every event before the last ACKs commit (or while an expired lease
    is being delivered again), so the states are read when they stop moving.
    """
    deadline = time.monotonic() + settle_timeout
    while True:
        rows = await cluster.query("SELECT id, event_id, state FROM deliveries")
        found = {row["event_id"]: (row["id"], row["state"]) for row in rows}
        moving = any(state in ("pending", "leased") for _, state in found.values())
        if not moving or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


def unexplained_duplicates(
    ledger: Ledger,
    deliveries: dict[str, tuple[str, str]],
    attempts: dict[str, list[asyncpg.Record]],
    allowed: set[str],
) -> list[str]:
    """Events delivered more than once although none of their attempts ended in `allowed`."""
    copies = ledger.copies()
    event_of = {a.load_id: a.event_id for a in ledger.arrivals}
    found = []
    for load_id, n in copies.items():
        if n < 2:
            continue
        delivery_id, _ = deliveries[event_of[load_id]]
        outcomes = [row["outcome"] for row in attempts.get(delivery_id, [])]
        if not allowed & set(outcomes):
            found.append(f"{load_id}: {n} copies, attempts {outcomes}")
    return found


async def test_three_replicas_share_the_work_without_double_leases(
    cluster: Callable[..., Awaitable[Cluster]], agents: Callable[..., harness.Agent]
) -> None:
    c = await cluster(3)
    r0 = c.replicas[0]
    ledger = Ledger(payload_bytes=128)
    async with Sink(ledger) as sink:
        agents(r0, sink.url, "agent-a", c.servers(0))
        agents(r0, sink.url, "agent-b", c.servers(1))
        started = time.monotonic()
        await post_spread(ledger, lambda n: c.replicas[n % 3].input_url(r0.input_id), 3000)
        await ledger.wait_delivered(timeout=60)
        elapsed = time.monotonic() - started
    report = ledger.report()
    assert report.answered_2xx == 3000, report.text()
    report.assert_sound()

    deliveries = await event_deliveries(c)
    attempts = await attempts_by_delivery(c)
    assert len(deliveries) == 3000
    assert {state for _, state in deliveries.values()} == {"delivered"}
    assert double_leases(attempts) == []
    assert unexplained_duplicates(ledger, deliveries, attempts, {"lease_expired"}) == []
    acked_by = {
        row["agent"].rpartition("/")[2]
        for history in attempts.values()
        for row in history
        if row["outcome"] == "ack"
    }
    assert acked_by == {"agent-a", "agent-b"}, acked_by  # both replicas' agents did work
    print(f"3 replicas, 3000 events in {elapsed:.1f}s; {report.text()}")


async def test_agents_of_a_killed_replica_move_to_another(
    cluster: Callable[..., Awaitable[Cluster]], agents: Callable[..., harness.Agent]
) -> None:
    c = await cluster(3)
    r0 = c.replicas[0]
    alive = [0, 1, 2]
    killed_at: list[float] = []
    ledger = Ledger(payload_bytes=128)

    async def kill_r0(done: int) -> None:
        if done == 300 and not killed_at:
            r0.kill()  # SIGKILL: no goodbye, its leases stay held until they expire
            killed_at.append(time.time())
            alive.remove(0)  # the load balancer notices and stops sending there

    async with Sink(ledger) as sink:
        a = agents(r0, sink.url, "agent-a", c.servers(0, 1, 2))
        agents(r0, sink.url, "agent-b", c.servers(1, 2, 0))
        await post_spread(
            ledger,
            lambda n: c.replicas[alive[n % len(alive)]].input_url(r0.input_id),
            900,
            on_sent=kill_r0,
        )
        await ledger.wait_delivered(timeout=45)
    report = ledger.report()
    assert killed_at, "the replica was never killed"
    report.assert_sound()
    assert report.answered_2xx >= 850, report.text()  # only calls in flight at the kill fail

    moved = [
        event
        for event in harness.log_events(a.log_text())
        if event.get("event") == "connecting"
        and event.get("server") != r0.grpc_address
        and harness.logged_at(event) >= killed_at[0]
    ]
    assert moved, "agent-a never dialled another replica after its own was killed"
    deliveries = await event_deliveries(c)
    attempts = await attempts_by_delivery(c)
    late_acks_by_a = [
        row
        for history in attempts.values()
        for row in history
        if row["outcome"] == "ack"
        and row["agent"].endswith("/agent-a")
        and row["started_at"] / 1000 > killed_at[0]
    ]
    assert late_acks_by_a, "agent-a delivered nothing through the other replicas"
    assert double_leases(attempts) == []
    allowed = {"lease_expired", "disconnected"}
    assert unexplained_duplicates(ledger, deliveries, attempts, allowed) == []


async def _latency(ledger: Ledger, session: ClientSession, url: str, seq: int) -> float:
    """Post one event to `url`; seconds from its 2xx answer to its arrival at the sink."""
    sent = await ledger.post(session, url, seq)
    assert sent.status == 200 and sent.answered is not None
    await harness.wait_until(
        lambda: sent.load_id in ledger.delivered_ids(), 10, f"event {seq} at the sink"
    )
    arrived = next(a.at for a in ledger.arrivals if a.load_id == sent.load_id)
    return arrived - sent.answered


async def _latencies(ledger: Ledger, url: str, first: int, count: int) -> list[float]:
    async with ClientSession() as session:
        return [await _latency(ledger, session, url, first + n) for n in range(count)]


async def test_notifications_wake_other_replicas_and_polling_covers_their_loss(
    cluster: Callable[..., Awaitable[Cluster]], agents: Callable[..., harness.Agent]
) -> None:
    # Polling alone would take up to 3 s: arrivals well under that come from NOTIFY.
    c = await cluster(2, "--poll-interval", "3s")
    r0, r1 = c.replicas
    ledger = Ledger(payload_bytes=64)
    async with Sink(ledger) as sink:
        agents(r0, sink.url, "agent", c.servers(1))
        await harness.wait_logged(
            r1.log_text, harness.logged("agent_connected"), 15, "the agent on replica 1"
        )
        url = r0.input_url()
        notified = await _latencies(ledger, url, 0, 8)
        assert max(notified) < 1.0, notified

        # The listener's connection is killed: it says so, reconnects, and events flow on.
        killed_at = time.time()
        terminated = await c.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'stowhook-listener' AND datname = $1",
            pg.database_name(c.url),
        )
        assert len(terminated) == 2  # one listener per replica
        for what in ("listener_down", "listener_up"):
            await harness.wait_logged(
                r1.log_text, harness.logged(what, since=killed_at), 10, f"{what} on replica 1"
            )
        after_reconnect = await _latencies(ledger, url, 100, 4)
        assert max(after_reconnect) < 1.0, after_reconnect

        # No notifications at all: replica 1 finds the events by polling, within 1 s.
        r1.stop()
        restarted_at = time.time()
        r1.start("--no-listen", "--poll-interval", "1s")
        await r1.wait_ready()
        await harness.wait_logged(
            r1.log_text,
            harness.logged("agent_connected", since=restarted_at),
            20,
            "the agent back on replica 1",
        )
        polled = await _latencies(ledger, url, 200, 6)
        assert max(polled) < 1.0 + 0.5, polled  # the interval plus a claim and a forward
        assert not [
            e
            for e in harness.log_events(r1.log_text())
            if e.get("event") == "listener_up" and harness.logged_at(e) >= restarted_at
        ]
    ledger.report().assert_sound()


async def test_wait_mode_answers_a_caller_held_by_another_replica(
    cluster: Callable[..., Awaitable[Cluster]], agents: Callable[..., harness.Agent]
) -> None:
    """The caller waits on replica 0, the only agent is on replica 1: the caller still
    gets the destination's own answer, through the database, with or without NOTIFY."""
    big = bytes(range(256)) * 80  # 20 KiB: more than a notification could carry

    def answer(_n: int, request: web.Request) -> web.Response:
        body = big if request.path == "/big" else f"hello {request.path}".encode()
        return web.Response(status=201, headers={"X-Answered-By": "target"}, body=body)

    c = await cluster(2, "--poll-interval", "3s")
    r0, r1 = c.replicas
    await r0.cli("input", "respond", r0.input_id, "--mode", "wait", "--timeout", "10s")
    await asyncio.sleep(2.5)  # the replicas' route caches (2 s) see the new mode
    async with harness.Target(answer) as target:
        agents(r0, target.url, "agent", c.servers(1))
        await harness.wait_logged(
            r1.log_text, harness.logged("agent_connected"), 15, "the agent on replica 1"
        )
        for tail in ("/orders", "/big"):
            started = time.monotonic()
            status, headers, body = await post(r0.input_url(tail=tail), b'{"id": 7}')
            waited = time.monotonic() - started
            expected = big if tail == "/big" else b"hello /orders"
            assert (status, body) == (201, expected), f"{tail}: {status} {body[:80]!r}"
            assert headers["X-Answered-By"] == "target"
            assert waited < 2.0, f"{tail}: the answer took {waited:.2f}s (NOTIFY should wake it)"

        # Replica 0 hears no notifications at all: it finds the answer at its next look.
        r0.stop()
        r0.start("--no-listen")
        await r0.wait_ready()
        await asyncio.sleep(2.5)
        status, _, body = await post(r0.input_url(tail="/polled"), b"{}")
        assert (status, body) == (201, b"hello /polled")
    left = await c.query("SELECT count(*) AS n FROM wait_replies")
    assert left[0]["n"] == 0, "every relayed answer was taken by its caller's replica"
    delivered = await c.query("SELECT count(*) AS n FROM deliveries WHERE state = 'delivered'")
    assert delivered[0]["n"] == 3
