"""Fault 6: the database cannot be written for a while, under load, with real processes.

Another process holds SQLite's write lock (`BEGIN EXCLUSIVE`), as a stuck backup or a
wedged admin shell would. The server's writer then waits its busy timeout (200 ms here)
and gives up. Clients must see 200 or 503 + Retry-After, never a 200 for an event that
was not committed, and the server must answer 200 again on its own once the lock goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import ClientSession

from tests.acceptance import harness

WORKERS = 4
PER_WORKER = 75  # 300 webhooks in all
PAUSE_S = 0.02
FAULT_AFTER_S = 0.8
FAULT_FOR_S = 1.5


@dataclass(frozen=True)
class Outcome:
    body: bytes
    status: int
    retry_after: str | None
    started: float
    ended: float


async def post_all(session: ClientSession, url: str, worker: int) -> list[Outcome]:
    outcomes = []
    for n in range(PER_WORKER):
        body = f'{{"worker": {worker}, "n": {n}}}'.encode()
        started = time.monotonic()
        async with session.post(url, data=body) as resp:
            await resp.read()
            outcomes.append(
                Outcome(
                    body, resp.status, resp.headers.get("Retry-After"), started, time.monotonic()
                )
            )
        await asyncio.sleep(PAUSE_S)
    return outcomes


class WriteLock:
    """Another process's connection holding the database's write lock."""

    def __init__(self, db_file: str) -> None:
        self._conn = sqlite3.connect(
            db_file, timeout=5, isolation_level=None, check_same_thread=False
        )

    async def hold(self) -> None:
        await asyncio.to_thread(self._conn.execute, "BEGIN EXCLUSIVE")

    async def release(self) -> None:
        await asyncio.to_thread(self._conn.execute, "ROLLBACK")

    def close(self) -> None:
        self._conn.close()


async def readyz(port: int) -> int:
    async with ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status


async def fault(lock: WriteLock, port: int) -> tuple[float, list[int]]:
    """Hold the lock for FAULT_FOR_S; return when it was released and /readyz meanwhile."""
    await asyncio.sleep(FAULT_AFTER_S)
    await lock.hold()
    await asyncio.sleep(0.3)
    ready_during = [await readyz(port)]
    await asyncio.sleep(FAULT_FOR_S - 0.3)
    await lock.release()
    return time.monotonic(), ready_during


def stored_events(relay: harness.Relay) -> int:
    with contextlib.closing(sqlite3.connect(relay.db_path, timeout=5)) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


async def test_an_unwritable_database_gets_503s_and_loses_no_acknowledged_event(
    relay: harness.Relay, agents
) -> None:
    relay.start("--sqlite-busy-timeout", "200ms")
    await relay.wait_ready()
    lock = WriteLock(str(relay.db_path))
    async with harness.Target() as target:
        agents(target.url, "--max-in-flight", "32")
        connector = aiohttp.TCPConnector(limit=WORKERS)
        async with ClientSession(connector=connector) as session:
            try:
                results = await asyncio.gather(
                    fault(lock, relay.http_port),
                    *(post_all(session, relay.input_url(), w) for w in range(WORKERS)),
                )
            finally:
                lock.close()
        (released_at, ready_during), *per_worker = results
        outcomes = [o for worker in per_worker for o in worker]

        ok = {o.body for o in outcomes if o.status == 200}
        refused = [o for o in outcomes if o.status == 503]
        assert len(outcomes) == WORKERS * PER_WORKER
        assert {o.status for o in outcomes} <= {200, 503}
        assert refused, "the fault never reached a client: the test proved nothing"
        assert all(o.retry_after for o in refused)
        assert ready_during == [503]
        assert await readyz(relay.http_port) == 200

        after = [o.ended for o in outcomes if o.status == 200 and o.started >= released_at]
        recovery_s = min(after) - released_at
        print(
            f"\nstorage fault: {len(ok)} x 200, {len(refused)} x 503, "
            f"first 200 {recovery_s * 1000:.0f} ms after the lock was released"
        )
        assert recovery_s < 2.0
        assert all(o.started < released_at for o in refused), "a 503 after recovery"

        await target.wait_for(len(ok), timeout=30)
        await asyncio.sleep(0.5)  # anything more would be a 503'd event delivered
        assert {r.body for r in target.received} == ok
    assert stored_events(relay) == len(ok), "a 503'd event was stored"
    assert relay.proc is not None and relay.proc.poll() is None
    assert "side_task_failed" not in relay.log_text()
