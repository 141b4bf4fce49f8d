"""The load generator's own accounting, against real processes on loopback.

It must count exactly what it sent and what arrived: a run against the bare app reports
the exact request count with zero errors (checked against the app's own counter), and a
relay that loses and duplicates known requests is reported with exactly those losses
and duplicates.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession, web

from bench import load, procs

ROOT = pathlib.Path(__file__).resolve().parents[2]


async def bench_load(*args: str, timeout: float = 60) -> list[dict[str, Any]]:
    """`python -m bench.load ARGS`: its JSON lines (it must exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.load",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]


@pytest.fixture
async def counting_app(tmp_path: pathlib.Path) -> AsyncIterator[str]:
    """bench.apps' sink (the bare app that also counts, GET /count) in its own process."""
    port = procs.free_port()
    async with procs.Group(tmp_path) as group:
        app = await group.python("sink", "bench.apps", "sink", str(port))
        await procs.wait_http(f"http://127.0.0.1:{port}/count", app, timeout=30)
        yield f"http://127.0.0.1:{port}"


async def test_a_run_against_the_bare_app_counts_every_request(counting_app: str) -> None:
    (result,) = await bench_load(
        "--workload=throughput",
        f"--ingest-url={counting_app}/in/x",
        "--requests=1500",
        "--connections=16",
        "--seconds=60",
    )
    async with ClientSession() as session, session.get(f"{counting_app}/count") as resp:
        received = (await resp.json())["n"]
    assert result["errors"] == {}
    assert (result["requests"], result["ok"], received) == (1500, 1500, 1500)
    assert result["rate"] > 0


async def test_errors_are_counted_not_hidden(counting_app: str) -> None:
    """Nothing listens on the second URL: every other request fails, and says so."""
    dead = f"http://127.0.0.1:{procs.free_port()}/in/x"
    (result,) = await bench_load(
        "--workload=throughput",
        f"--ingest-url={counting_app}/in/x",
        f"--ingest-url={dead}",
        "--requests=200",
        "--connections=4",
        "--seconds=60",
    )
    assert result["requests"] == 200
    assert result["ok"] == 100
    assert sum(result["errors"].values()) == 100


def _number(request_id: str) -> int:
    return int(request_id.rsplit("-", 1)[1])


@pytest.fixture
async def flawed_relay() -> AsyncIterator[tuple[str, int]]:
    """A 'relay' that answers 200, never forwards every 7th request and forwards every
    10th twice (numbers from the generator's ids). Yields its URL and the sink port."""
    sink_port = procs.free_port()
    port = procs.free_port()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        request_id = request.headers[load.ID_HEADER]
        copies = 0 if _number(request_id) % 7 == 0 else 2 if _number(request_id) % 10 == 0 else 1
        headers = {name: request.headers[name] for name in (load.ID_HEADER, load.SENT_HEADER)}
        async with ClientSession() as session:
            for _ in range(copies):
                async with session.post(
                    f"http://127.0.0.1:{sink_port}/", data=body, headers=headers
                ) as resp:
                    assert resp.status == 200
        return web.Response()

    app = web.Application()
    app.router.add_post("/in", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/in", sink_port
    finally:
        await runner.cleanup()


async def test_losses_and_duplicates_are_reported_exactly(
    flawed_relay: tuple[str, int],
) -> None:
    url, sink_port = flawed_relay
    burst, outage, paced = await bench_load(
        f"--ingest-url={url}",
        f"--sink-port={sink_port}",
        "--requests=100",
        "--outage-events=10",
        "--rate=40",
        "--seconds=0.5",
        "--arrival-timeout=3",
        "--stop-cmd=true",
        "--start-cmd=true",
    )
    # The generator numbers requests across workloads: burst 0-99, outage 100-109, paced 110-129.
    for result, numbers in (
        (burst, range(100)),
        (outage, range(100, 110)),
        (paced, range(110, 130)),
    ):
        lost = [n for n in numbers if n % 7 == 0]
        twice = [n for n in numbers if n % 10 == 0 and n % 7 != 0]
        assert result["accepted"] == len(numbers), result
        assert (result["lost"], result["duplicated"]) == (len(lost), len(twice)), result
        assert result["arrived"] == len(numbers) - len(lost)
        assert result["unexpected"] == 0
        assert result["latency_ms"]["p50"] is not None


async def test_the_tool_pauses_for_whoever_stops_the_forwarder() -> None:
    """Without --stop-cmd/--start-cmd it asks on stdout and waits for a line on stdin;
    posting straight to its own sink, everything arrives exactly once."""
    port = procs.free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.load",
        f"--ingest-url=http://127.0.0.1:{port}/direct",
        f"--sink-port={port}",
        "--requests=50",
        "--outage-events=5",
        "--rate=20",
        "--seconds=0.5",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[dict[str, Any]] = []
    try:
        while len(lines) < 5:
            line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            lines.append(line)
            if "pause" in line:
                proc.stdin.write(b"\n")
                await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert [line.get("pause") or line["workload"] for line in lines] == [
        "burst",
        "stop the forwarder",
        "start the forwarder",
        "outage",
        "paced",
    ]
    results = [line for line in lines if "workload" in line]
    assert [r["accepted"] for r in results] == [50, 5, 10]
    assert all(r["arrived"] == r["accepted"] and r["lost"] == r["duplicated"] == 0 for r in results)
