"""The load generator and arrival checker: drives any HTTP ingress, counts what arrives.

    python -m bench.load --ingest-url URL --sink-port N [--stop-cmd CMD --start-cmd CMD]

runs the standard workloads against any relay whose forwarder delivers to
http://127.0.0.1:N/ (the sink in this process):

  burst    1,000 x 1 KiB POSTs, 16 at a time, with the forwarder up
  outage   100 POSTs while the forwarder is stopped, then it is started again
  paced    50 requests/s for 10 s

and prints one JSON line per workload: accepted (2xx), errors, arrived, lost (accepted,
never arrived), duplicated (arrivals beyond the first), unexpected (arrived, never
accepted), and latency percentiles from each request's start to its first arrival at the
sink. Stopping and starting the forwarder: --stop-cmd/--start-cmd run a shell command;
without them the tool pauses: it prints {"pause": "..."} on stdout, asks on stderr, and
goes on when a line arrives on stdin.

Each request carries its id in `X-Bench-Id` and its start (CLOCK_MONOTONIC, ns) in
`X-Bench-Sent`; the body starts with `bench-id=<id>` too, for relays that drop headers.

The bench suite also uses (--workload):
  throughput  POST as fast as --connections allow, for --seconds or exactly --requests
  latency     only the paced workload, at --rate for --seconds
  sink        only the sink: count arrivals until --expect have come, or --timeout

Every loop is bounded by a count and a time limit; only loopback is ever contacted by
the suite (this tool itself sends wherever --ingest-url points).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from bench import procs

ID_HEADER = "X-Bench-Id"
SENT_HEADER = "X-Bench-Sent"
BODY_PREFIX = b"bench-id="
REQUEST_TIMEOUT_S = 120.0
PAUSE_TIMEOUT_S = 600.0  # a stop/start command, or a person at the prompt
LINGER_S = 0.5  # after the last expected arrival: time for duplicates to show up
BURST_LIMIT_S = 600.0  # a burst starts no request after this long
MAX_PACED_IN_FLIGHT = 1024  # the paced workload never holds more requests than this


def body_for(request_id: str, size: int) -> bytes:
    """`bench-id=<id>` and a newline, padded with 'x' to `size` bytes (at least the id)."""
    head = BODY_PREFIX + request_id.encode() + b"\n"
    return head + b"x" * max(0, size - len(head))


def percentiles_ms(values_ns: Sequence[int]) -> dict[str, float | None]:
    """p50, p90, p99 and max of durations in ns, as ms (None when there are none)."""
    if not values_ns:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ms = [v / 1e6 for v in values_ns]
    if len(ms) == 1:
        return dict.fromkeys(("p50", "p90", "p99", "max"), round(ms[0], 3))
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], 3),
        "p90": round(cuts[89], 3),
        "p99": round(cuts[98], 3),
        "max": round(max(ms), 3),
    }


# ---- the sink: what arrives ----------------------------------------------------------


@dataclass
class Sink:
    """Records every request it gets by the id the generator gave it."""

    per_path: bool = False  # count (id, path) pairs: one event fanned out to several paths
    first_ns: dict[str, int] = field(default_factory=dict)
    copies: collections.Counter[str] = field(default_factory=collections.Counter)
    anonymous: int = 0  # requests that carried no id at all
    last_ns: int = 0
    expect: int | None = None
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.receive)
        return app

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic_ns()
        request_id = request.headers.get(ID_HEADER) or _id_in_body(body)
        if request_id is None:
            self.anonymous += 1
            return web.Response()
        key = f"{request_id} {request.path}" if self.per_path else request_id
        self.copies[key] += 1
        self.first_ns.setdefault(key, now)
        self.last_ns = now
        if self.expect is not None and len(self.first_ns) >= self.expect:
            self.enough.set()
        return web.Response()

    def arrived(self, request_id: str) -> bool:
        return request_id in self.first_ns

    async def wait_for(self, ids: set[str], timeout: float) -> None:
        """Until every id in `ids` arrived, or `timeout`; then LINGER_S for late copies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(self.arrived(i) for i in ids):
            await asyncio.sleep(0.02)
        await asyncio.sleep(LINGER_S)

    def report(self, accepted: dict[str, int], prefix: str) -> dict[str, Any]:
        """Reconcile what was accepted (id -> sent ns) with what arrived.

        Unexpected: arrivals with ids of this workload (`prefix`) that were not accepted.
        """
        arrived = [i for i in accepted if i in self.first_ns]
        mine = [key for key in self.first_ns if key.startswith(prefix)]
        return {
            "accepted": len(accepted),
            "arrived": len(arrived),
            "lost": len(accepted) - len(arrived),
            "duplicated": sum(self.copies[i] - 1 for i in accepted if self.copies[i] > 1),
            "unexpected": sum(1 for key in mine if key not in accepted),
            "latency_ms": percentiles_ms([self.first_ns[i] - accepted[i] for i in arrived]),
        }


def _id_in_body(body: bytes) -> str | None:
    if not body.startswith(BODY_PREFIX):
        return None
    return body[len(BODY_PREFIX) :].partition(b"\n")[0].decode(errors="replace") or None


@contextlib.asynccontextmanager
async def serving(sink: Sink, port: int) -> AsyncIterator[Sink]:
    runner = web.AppRunner(sink.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield sink
    finally:
        await runner.cleanup()


# ---- the generator: what is sent ------------------------------------------------------


@dataclass
class Sent:
    """The generator's own ledger of one workload."""

    accepted: dict[str, int] = field(default_factory=dict)  # id -> sent at (monotonic ns)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: int = 0
    latencies_ns: list[int] = field(default_factory=list)  # request start to answer

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": len(self.accepted),
            "errors": dict(self.errors),
            "answer_ms": percentiles_ms(self.latencies_ns),
        }


class Generator:
    """POSTs to one or more URLs (round robin) over keep-alive connections."""

    def __init__(self, session: ClientSession, urls: Sequence[str], run_id: str) -> None:
        self.session = session
        self.urls = list(urls)
        self.run_id = run_id
        self._numbers = itertools.count()

    def prefix(self, workload: str) -> str:
        return f"{self.run_id}-{workload}-"

    def next_id(self, workload: str) -> tuple[str, str]:
        n = next(self._numbers)
        return f"{self.prefix(workload)}{n}", self.urls[n % len(self.urls)]

    async def post(self, sent: Sent, workload: str, body_bytes: int) -> None:
        request_id, url = self.next_id(workload)
        await self.post_body(sent, request_id, url, body_for(request_id, body_bytes))

    async def post_body(self, sent: Sent, request_id: str, url: str, body: bytes) -> None:
        started = time.monotonic_ns()
        headers = {ID_HEADER: request_id, SENT_HEADER: str(started)}
        sent.requests += 1
        try:
            async with self.session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (ClientError, OSError, TimeoutError) as exc:
            sent.errors[type(exc).__name__] += 1
            return
        sent.latencies_ns.append(time.monotonic_ns() - started)
        if 200 <= status < 300:
            sent.accepted[request_id] = started
        else:
            sent.errors[f"HTTP {status}"] += 1

    async def burst(self, count: int, concurrency: int, workload: str, body_bytes: int) -> Sent:
        """Exactly `count` POSTs, `concurrency` at a time (none started after BURST_LIMIT_S)."""
        sent = Sent()
        numbers = iter(range(count))
        deadline = time.monotonic() + BURST_LIMIT_S

        async def worker() -> None:
            for _ in numbers:
                if time.monotonic() >= deadline:
                    return
                await self.post(sent, workload, body_bytes)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sent

    async def flood(self, connections: int, seconds: float, limit: int, body_bytes: int) -> Sent:
        """As fast as `connections` allow, until `seconds` passed or `limit` were sent.

        One body is reused for every request (its id line is the first request's; the
        header carries each request's own id): building a 10 MiB body per request would
        measure the generator.
        """
        sent = Sent()
        body = body_for(f"{self.run_id}-throughput", body_bytes)
        deadline = time.monotonic() + seconds
        numbers = iter(range(limit))

        async def worker() -> None:
            for _ in numbers:
                if time.monotonic() >= deadline:
                    return
                request_id, url = self.next_id("throughput")
                await self.post_body(sent, request_id, url, body)

        await asyncio.gather(*(worker() for _ in range(connections)))
        return sent

    async def paced(self, rate: float, seconds: float, workload: str, body_bytes: int) -> Sent:
        """One POST every 1/rate s for `seconds` (open loop: a slow answer delays nothing)."""
        sent = Sent()
        total = max(1, round(rate * seconds))
        slots = asyncio.Semaphore(MAX_PACED_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()

        async def one() -> None:
            try:
                await self.post(sent, workload, body_bytes)
            finally:
                slots.release()

        for n in range(total):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        return sent


def session_for(connections: int) -> ClientSession:
    return ClientSession(
        connector=TCPConnector(limit=connections, limit_per_host=connections),
        timeout=ClientTimeout(total=REQUEST_TIMEOUT_S),
    )


# ---- workloads -----------------------------------------------------------------------


def emit(document: dict[str, Any]) -> None:
    print(json.dumps(document), flush=True)


async def pause(what: str, command: str | None) -> None:
    """Have the forwarder stopped or started: by `command`, or by whoever reads stdout."""
    if command:
        proc = await asyncio.create_subprocess_shell(command)
        code = await asyncio.wait_for(proc.wait(), PAUSE_TIMEOUT_S)
        if code != 0:
            raise RuntimeError(f"{command!r} exited with {code}")
        return
    emit({"pause": what})
    print(f"bench.load: {what}, then press Enter", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), PAUSE_TIMEOUT_S)
    if not line:
        raise RuntimeError(f"stdin closed while waiting to {what}")


def result(workload: str, sent: Sent, sink: Sink, gen: Generator, **extra: Any) -> None:
    """Print one workload's line: the generator's ledger reconciled with the sink's."""
    report = sink.report(sent.accepted, gen.prefix(workload))
    emit({"workload": workload, **extra, **sent.summary(), **report})


async def standard(options: argparse.Namespace) -> int:
    """burst, outage and paced, against --ingest-url, arrivals at the sink."""
    sink, size = Sink(), options.body_bytes
    async with serving(sink, options.sink_port), session_for(options.concurrency) as session:
        gen = Generator(session, options.ingest_url, options.run_id)
        sent = await gen.burst(options.requests, options.concurrency, "burst", size)
        await sink.wait_for(set(sent.accepted), options.arrival_timeout)
        result("burst", sent, sink, gen)

        await pause("stop the forwarder", options.stop_cmd)
        sent = await gen.burst(options.outage_events, options.concurrency, "outage", size)
        early = sum(sink.arrived(i) for i in sent.accepted)
        await pause("start the forwarder", options.start_cmd)
        await sink.wait_for(set(sent.accepted), options.arrival_timeout)
        result("outage", sent, sink, gen, arrived_while_stopped=early)

        sent = await gen.paced(options.rate, options.seconds, "paced", size)
        await sink.wait_for(set(sent.accepted), options.arrival_timeout)
        result("paced", sent, sink, gen, rate=options.rate)
    return 0


async def latency(options: argparse.Namespace) -> int:
    sink = Sink()
    async with serving(sink, options.sink_port), session_for(MAX_PACED_IN_FLIGHT) as session:
        emit({"ready": True})
        gen = Generator(session, options.ingest_url, options.run_id)
        sent = await gen.paced(options.rate, options.seconds, "paced", options.body_bytes)
        await sink.wait_for(set(sent.accepted), options.arrival_timeout)
        result("paced", sent, sink, gen, rate=options.rate)
    return 0


async def throughput(options: argparse.Namespace) -> int:
    limit = options.requests if options.requests is not None else sys.maxsize
    async with session_for(options.connections) as session:
        gen = Generator(session, options.ingest_url, options.run_id)
        started = time.monotonic()
        sent = await gen.flood(options.connections, options.seconds, limit, options.body_bytes)
        elapsed = time.monotonic() - started
    ok = len(sent.accepted)
    emit(
        {
            "workload": "throughput",
            **sent.summary(),
            "seconds": round(elapsed, 4),
            "rate": ok / elapsed,
            "mib_per_s": ok * options.body_bytes / elapsed / 2**20,
        }
    )
    return 0


async def sink_only(options: argparse.Namespace) -> int:
    sink = Sink(per_path=options.per_path, expect=options.expect)
    async with serving(sink, options.sink_port):
        emit({"ready": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sink.enough.wait(), options.timeout)
        await asyncio.sleep(LINGER_S)
    emit(
        {
            "workload": "sink",
            "expected": options.expect,
            "unique": len(sink.first_ns),
            "duplicated": sum(n - 1 for n in sink.copies.values()),
            "anonymous": sink.anonymous,
            "first_ns": min(sink.first_ns.values(), default=0),
            "last_ns": sink.last_ns,
        }
    )
    return 0


# ---- for the bench driver: this tool in a process of its own --------------------------


async def spawn(group: procs.Group, name: str, *args: str, stdin: bool = False) -> procs.Child:
    """`python -m bench.load ARGS` as a child of `group`."""
    return await group.python(name, "bench.load", *args, stdin=stdin)


async def flood(
    group: procs.Group,
    name: str,
    urls: Sequence[str],
    *,
    connections: int,
    seconds: float,
    body_bytes: int = 1024,
    requests: int | None = None,
) -> dict[str, Any]:
    """The throughput workload's result: rate, mib_per_s, ok, errors, answer_ms."""
    args = ["--workload", "throughput", "--connections", str(connections)]
    args += ["--seconds", str(seconds), "--body-bytes", str(body_bytes)]
    args += [f"--ingest-url={url}" for url in urls]
    if requests is not None:
        args += ["--requests", str(requests)]
    child = await spawn(group, name, *args)
    result = await child.message(timeout=seconds + REQUEST_TIMEOUT_S + 60)
    await child.wait(30)
    return result


WORKLOADS = {"standard": standard, "latency": latency, "throughput": throughput, "sink": sink_only}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[1],
    )
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="standard")
    p.add_argument("--ingest-url", action="append", default=[], help="repeat: round robin")
    p.add_argument("--sink-port", type=int, help="the sink listens on 127.0.0.1:PORT")
    p.add_argument("--body-bytes", type=int, default=1024)
    p.add_argument(
        "--requests", type=int, help="burst: how many (default 1000); throughput: exactly this many"
    )
    p.add_argument("--concurrency", type=int, default=16, help="burst and outage")
    p.add_argument("--outage-events", type=int, default=100)
    p.add_argument("--rate", type=float, default=50.0, help="paced: requests per second")
    p.add_argument("--seconds", type=float, default=10.0, help="paced and throughput")
    p.add_argument("--connections", type=int, default=64, help="throughput")
    p.add_argument("--arrival-timeout", type=float, default=60.0)
    p.add_argument("--stop-cmd", help="shell command that stops the forwarder")
    p.add_argument("--start-cmd", help="shell command that starts it again")
    p.add_argument("--expect", type=int, help="sink: arrivals to wait for")
    p.add_argument("--per-path", action="store_true", help="sink: count (id, path) pairs")
    p.add_argument("--timeout", type=float, default=600.0, help="sink: longest wait")
    p.add_argument("--run-id", default=uuid.uuid4().hex[:8], help="prefix of request ids")
    return p


def check(options: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    needs_url = options.workload != "sink"
    needs_sink = options.workload in ("standard", "latency", "sink")
    if needs_url and not options.ingest_url:
        p.error("--ingest-url is required")
    if needs_sink and options.sink_port is None:
        p.error("--sink-port is required")
    if options.workload == "sink" and options.expect is None:
        p.error("--workload sink needs --expect")
    if options.workload == "standard" and options.requests is None:
        options.requests = 1000
    for name in ("rate", "seconds", "connections", "concurrency", "arrival_timeout", "timeout"):
        if getattr(options, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    options = p.parse_args(argv)
    check(options, p)
    return procs.run_fast(WORKLOADS[options.workload](options))


if __name__ == "__main__":
    sys.exit(main())
