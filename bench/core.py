"""Ingest and drain figures for the core relay, each a ratio against a baseline measured
in the same run on the same machine. Loopback only; every loop is bounded.

    python -m bench.core [--events 2000] [--concurrency 64] [--body-bytes 1024]

Figures:
  ingest_rps      webhooks/s answered 200 by relay-server (sealed + committed)
                  vs `bare`: a minimal aiohttp app that reads the body and answers 200
  ingest_p50/p99  latency of those requests vs the same on `bare`
  drain_rps       events/s from the stored backlog through relay-agent to a sink
                  vs `direct`: the load generator posting straight to that sink
  server_rss      relay-server resident memory after the drain (no baseline)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import ClientSession, ClientTimeout, TCPConnector

BIN = pathlib.Path(sys.executable).parent
TIMEOUT_S = 300
# Extra `relay-server serve` flags, e.g. BENCH_SERVE_ARGS="--sqlite-synchronous NORMAL".
EXTRA_SERVE = os.environ.get("BENCH_SERVE_ARGS", "").split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(args: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def wait_http(url: str) -> None:
    deadline = time.monotonic() + 30
    async with ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def load(url: str, events: int, concurrency: int, body: bytes) -> tuple[float, list[float]]:
    """POST `events` bodies with `concurrency` in flight; returns (seconds, latencies)."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(events):
        queue.put_nowait(n)
    failures = 0

    async def worker(session: ClientSession) -> None:
        nonlocal failures
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            async with session.post(url, data=body) as resp:
                await resp.read()
                failures += resp.status != 200
            latencies.append(time.perf_counter() - started)

    connector = TCPConnector(limit=concurrency)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} requests to {url} were not answered 200")
    return elapsed, latencies


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def figure(
    name: str, value: float, unit: str, base_name: str | None = None, base: float | None = None
) -> dict[str, object]:
    return {
        "name": name,
        "value": round(value, 2),
        "unit": unit,
        "baseline_name": base_name,
        "baseline_value": None if base is None else round(base, 2),
        "ratio": None if not base else round(value / base, 3),
    }


def setup_relay(home: pathlib.Path, http_port: int, grpc_port: int) -> tuple[list[str], str, str]:
    common = [
        str(BIN / "relay-server"),
        "--database-url",
        f"sqlite:///{home}/relay.db",
        "--key-file",
        str(home / "relay.key"),
        "--public-url",
        f"http://127.0.0.1:{http_port}",
        "--log-level",
        "warning",
    ]
    subprocess.run([*common, "quickstart"], check=True, capture_output=True, cwd=home)
    listed = subprocess.run([*common, "input", "list", "--json"], check=True, capture_output=True)
    token = (home / "quickstart-agent.token").read_text().strip()
    return common, json.loads(listed.stdout)[0]["url"], token


async def drained(sink: str, events: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    async with ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(f"{sink}/count") as resp:
                if (await resp.json())["n"] >= events:
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError("the agent did not drain the backlog in time")


async def run(events: int, concurrency: int, body_bytes: int) -> list[dict[str, object]]:
    body = os.urandom(body_bytes)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        home = pathlib.Path(tmp)
        bare_port, sink_port, http_port, grpc_port = (free_port() for _ in range(4))
        common, input_url, token = setup_relay(home, http_port, grpc_port)
        with process([sys.executable, "-m", "bench.apps", "bare", str(bare_port)]):
            await wait_http(f"http://127.0.0.1:{bare_port}/")
            bare_s, bare_lat = await load(
                f"http://127.0.0.1:{bare_port}/x", events, concurrency, body
            )
        serve = [
            *common,
            "serve",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--grpc-listen",
            f"127.0.0.1:{grpc_port}",
            *EXTRA_SERVE,
        ]
        with process(serve) as server:
            await wait_http(f"http://127.0.0.1:{http_port}/healthz")
            relay_s, relay_lat = await load(input_url, events, concurrency, body)
            results += [
                figure("ingest_rps", events / relay_s, "req/s", "bare", events / bare_s),
                figure(
                    "ingest_p50",
                    quantile(relay_lat, 0.5) * 1000,
                    "ms",
                    "bare",
                    quantile(bare_lat, 0.5) * 1000,
                ),
                figure(
                    "ingest_p99",
                    quantile(relay_lat, 0.99) * 1000,
                    "ms",
                    "bare",
                    quantile(bare_lat, 0.99) * 1000,
                ),
            ]
            sink = f"http://127.0.0.1:{sink_port}"
            with process([sys.executable, "-m", "bench.apps", "sink", str(sink_port)]):
                await wait_http(f"{sink}/count")
                direct_s, _ = await load(f"{sink}/direct", events, concurrency, body)
                started = time.perf_counter()
                agent = [
                    str(BIN / "relay-agent"),
                    "run",
                    "--server",
                    f"127.0.0.1:{grpc_port}",
                    "--insecure",
                    "--bucket",
                    "quickstart",
                    "--forward",
                    sink,
                    "--max-in-flight",
                    str(concurrency),
                    "--log-level",
                    "warning",
                ]
                with process(agent, env={**os.environ, "STOWHOOK_TOKEN": token}):
                    await drained(sink, 2 * events)
                    drain_s = time.perf_counter() - started
            results += [
                figure("drain_rps", events / drain_s, "events/s", "direct", events / direct_s),
                figure("server_rss", rss_mib(server.pid), "MiB"),
            ]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--body-bytes", type=int, default=1024)
    options = parser.parse_args()
    results = asyncio.run(run(options.events, options.concurrency, options.body_bytes))
    for item in results:
        print(json.dumps(item))
    print(f"\n{'figure':<12} {'value':>10} {'unit':<9} {'baseline':>10} {'ratio':>7}")
    for item in results:
        base = (
            ""
            if item["baseline_value"] is None
            else f"{item['baseline_value']} ({item['baseline_name']})"
        )
        ratio = "" if item["ratio"] is None else f"{item['ratio']:.3f}"
        print(f"{item['name']:<12} {item['value']:>10} {item['unit']:<9} {base:>10} {ratio:>7}")
    print(
        f"\n{options.events} events of {options.body_bytes} B, {options.concurrency} in flight, "
        f"{os.cpu_count()} CPUs, serve {' '.join(EXTRA_SERVE) or 'defaults (synchronous=FULL)'}"
    )


if __name__ == "__main__":
    main()
