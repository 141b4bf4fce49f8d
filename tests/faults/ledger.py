"""Account for every webhook in a fault test: what was sent, answered, delivered.

A load generator posts events that each carry a unique id (`X-Load-Id`) and the SHA-256
of their body (`X-Load-Hash`). The agent forwards them to a `Sink`, which records every
arrival. `Ledger.report()` then reconciles the two sides:

* lost        answered 2xx by the relay but never delivered (must be 0),
* corrupted   delivered with a body whose hash is not the one sent (must be 0),
* unexpected  delivered but never sent (must be 0),
* duplicates  extra copies beyond the first, with their rate and the most copies of one id
              (at-least-once: allowed, but bounded by what each test states).

Used by tests/faults/ and by bench/faults.py, which prints the same report for a longer run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import ClientSession, web

from tests.acceptance.harness import Target

ID_HEADER = "X-Load-Id"
HASH_HEADER = "X-Load-Hash"


@dataclass
class Sent:
    load_id: str
    digest: str
    started: float
    status: int | None = None  # None: no answer (connection refused, reset, timeout)
    answered: float | None = None
    retry_after: str | None = None  # the answer's Retry-After header, if any


@dataclass
class Arrival:
    load_id: str
    ok: bool  # the body's hash matches its X-Load-Hash
    event_id: str
    attempt: str
    at: float


@dataclass
class Report:
    sent: int
    answered_2xx: int
    answered_error: dict[int, int]
    no_answer: int
    delivered_unique: int
    lost: list[str]
    corrupted: int
    unexpected: int
    duplicates: int
    duplicate_rate: float
    max_copies: int
    latency_ms: dict[str, float]
    recovery_ms: list[float] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered_2xx": self.answered_2xx,
            "answered_error": {str(k): v for k, v in sorted(self.answered_error.items())},
            "no_answer": self.no_answer,
            "delivered_unique": self.delivered_unique,
            "lost": len(self.lost),
            "corrupted": self.corrupted,
            "unexpected": self.unexpected,
            "duplicates": self.duplicates,
            "duplicate_rate": round(self.duplicate_rate, 5),
            "max_copies": self.max_copies,
            "latency_ms": self.latency_ms,
            "recovery_ms": [round(ms, 1) for ms in self.recovery_ms],
            "settings": self.settings,
        }

    def text(self) -> str:
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(self.answered_error.items())) or "none"
        lat = self.latency_ms
        recovery = ", ".join(f"{ms:.0f}" for ms in self.recovery_ms) or "-"
        return "\n".join(
            [
                f"sent {self.sent}: 2xx {self.answered_2xx}, error {errors}, "
                f"no answer {self.no_answer}",
                f"delivered {self.delivered_unique} unique; lost {len(self.lost)}, "
                f"corrupted {self.corrupted}, unexpected {self.unexpected}",
                f"duplicates {self.duplicates} (rate {self.duplicate_rate:.4f}, "
                f"max copies of one id {self.max_copies})",
                f"answer→delivery latency ms: p50 {lat.get('p50', 0):.0f}, "
                f"p99 {lat.get('p99', 0):.0f}, max {lat.get('max', 0):.0f}",
                f"recovery after each fault, ms: {recovery}",
                "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
            ]
        )

    def assert_sound(self, *, max_copies: int | None = None) -> None:
        """Nothing lost, corrupted or unexpected; at most `max_copies` of any one id."""
        assert not self.lost, f"{len(self.lost)} events answered 2xx were never delivered:\n" + (
            self.text()
        )
        assert self.corrupted == 0, self.text()
        assert self.unexpected == 0, self.text()
        if max_copies is not None:
            assert self.max_copies <= max_copies, self.text()


class Ledger:
    """Both sides of a fault test: what the load generator sent, what the sink received."""

    def __init__(self, payload_bytes: int = 256) -> None:
        self.sent: dict[str, Sent] = {}
        self.arrivals: list[Arrival] = []
        self._pad = "x" * payload_bytes

    # ---- the sending side ----------------------------------------------------------------

    def make(self, seq: int) -> tuple[str, bytes, dict[str, str]]:
        """A fresh event: its id, body and headers (nothing recorded yet)."""
        load_id = uuid.uuid4().hex
        body = json.dumps({"id": load_id, "seq": seq, "pad": self._pad}).encode()
        digest = hashlib.sha256(body).hexdigest()
        return load_id, body, {ID_HEADER: load_id, HASH_HEADER: digest}

    async def post(
        self, session: ClientSession, url: str, seq: int, *, timeout: float = 10
    ) -> Sent:
        """Send one event and record how the relay answered."""
        load_id, body, headers = self.make(seq)
        record = Sent(load_id, headers[HASH_HEADER], time.monotonic())
        self.sent[load_id] = record
        try:
            async with session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                record.status = resp.status
                record.retry_after = resp.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError, OSError):
            record.status = None
        record.answered = time.monotonic()
        return record

    async def load(
        self,
        url: str,
        count: int,
        *,
        rate: float | None = None,
        concurrency: int = 8,
        on_sent: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Post `count` events with up to `concurrency` in flight, at most `rate` per second.

        `on_sent(n)` runs after the n-th answer (a hook to inject faults mid-load).
        """
        next_seq = 0
        done = 0
        started = time.monotonic()

        async def worker(session: ClientSession) -> None:
            nonlocal next_seq, done
            while next_seq < count:
                seq = next_seq
                next_seq += 1
                if rate is not None:
                    delay = started + seq / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await self.post(session, url, seq)
                done += 1
                if on_sent is not None:
                    await on_sent(done)

        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        async with ClientSession(connector=connector) as session:
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))

    # ---- the receiving side --------------------------------------------------------------

    def record(self, headers: Any, body: bytes) -> Arrival:
        """Note one delivery (headers: any mapping with .get, e.g. request.headers)."""
        load_id = headers.get(ID_HEADER, "")
        arrival = Arrival(
            load_id=load_id,
            ok=hashlib.sha256(body).hexdigest() == headers.get(HASH_HEADER, ""),
            event_id=headers.get("X-Stowhook-Event-Id", ""),
            attempt=headers.get("X-Stowhook-Attempt", ""),
            at=time.monotonic(),
        )
        self.arrivals.append(arrival)
        return arrival

    def delivered_ids(self) -> set[str]:
        return {a.load_id for a in self.arrivals}

    def copies(self) -> Counter[str]:
        return Counter(a.load_id for a in self.arrivals)

    def accepted(self) -> list[Sent]:
        return [s for s in self.sent.values() if s.status is not None and 200 <= s.status < 300]

    def all_accepted_delivered(self) -> bool:
        delivered = self.delivered_ids()
        return all(s.load_id in delivered for s in self.accepted())

    async def wait_delivered(self, timeout: float) -> None:
        """Until every 2xx event has arrived at least once (or the timeout; no assert)."""
        deadline = time.monotonic() + timeout
        while not self.all_accepted_delivered() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def report(
        self, *, recovery_ms: list[float] | None = None, settings: dict[str, str] | None = None
    ) -> Report:
        copies = self.copies()
        first_at: dict[str, float] = {}
        for a in self.arrivals:
            first_at.setdefault(a.load_id, a.at)
        accepted = self.accepted()
        lost = [s.load_id for s in accepted if s.load_id not in first_at]
        latencies = sorted(
            (first_at[s.load_id] - (s.answered or s.started)) * 1000
            for s in accepted
            if s.load_id in first_at
        )
        errors = Counter(
            s.status
            for s in self.sent.values()
            if s.status is not None and not 200 <= s.status < 300
        )
        known = [lid for lid in copies if lid in self.sent]
        delivered = sum(copies[lid] for lid in known)
        duplicates = sum(copies[lid] - 1 for lid in known)
        return Report(
            sent=len(self.sent),
            answered_2xx=len(accepted),
            answered_error=dict(errors),
            no_answer=sum(1 for s in self.sent.values() if s.status is None),
            delivered_unique=len(known),
            lost=lost,
            corrupted=sum(1 for a in self.arrivals if a.load_id in self.sent and not a.ok),
            unexpected=sum(1 for a in self.arrivals if a.load_id not in self.sent),
            duplicates=duplicates,
            duplicate_rate=duplicates / delivered if delivered else 0.0,
            max_copies=max((copies[lid] for lid in known), default=0),
            latency_ms=_percentiles(latencies),
            recovery_ms=list(recovery_ms or []),
            settings=dict(settings or {}),
        )


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": values[0], "p99": values[0], "max": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p99": cuts[98], "max": values[-1]}


Responder = Callable[[Arrival, web.Request], Awaitable[web.StreamResponse | None]]


class HoldNext:
    """A Sink responder: the next arrival after arm() gets no answer until release().

    That request stays open, as a stuck or slow service would keep it; every other
    arrival is answered 200 at once.
    """

    def __init__(self) -> None:
        self.held: Arrival | None = None
        self._armed = False
        self._arrived = asyncio.Event()
        self._released = asyncio.Event()

    def arm(self) -> None:
        self._armed = True

    async def wait_held(self, timeout: float) -> Arrival:
        await asyncio.wait_for(self._arrived.wait(), timeout)
        assert self.held is not None
        return self.held

    def release(self) -> None:
        """Answer the held request 200 (if its client is still there to read it)."""
        self._released.set()

    async def __call__(self, arrival: Arrival, request: web.Request) -> web.StreamResponse | None:
        if self._armed and self.held is None:
            self.held = arrival
            self._arrived.set()
            await self._released.wait()
        return None


class Sink(Target):
    """The internal service behind the agent: records each arrival in the ledger.

    `respond(arrival, request)` may delay, fail (return a non-2xx response) or return None
    for a plain 200. Arrivals are recorded when the request is read, before the answer.
    """

    def __init__(self, ledger: Ledger, respond: Responder | None = None) -> None:
        super().__init__(self._answer)
        self.ledger = ledger
        self.respond = respond
        self.in_flight = 0
        self.max_in_flight = 0

    async def _answer(self, _count: int, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            arrival = self.ledger.record(request.headers, await request.read())
            answer = await self.respond(arrival, request) if self.respond else None
            return answer if answer is not None else web.Response(status=200)
        finally:
            self.in_flight -= 1
