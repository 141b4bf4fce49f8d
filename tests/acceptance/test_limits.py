"""Limits a sender meets on a real relay-server: request rates, slow senders, header sizes.

Each test starts the server process with the limit under test and talks plain HTTP (or raw
TCP) to it on loopback, then counts what was stored with the CLI.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import ClientSession, TCPConnector

from tests.acceptance import harness
from tests.integration.test_slow_senders import trickle, until_closed

# Test 7: an input limited to RATE/s with BURST, offered ten times that for DURATION_S.
RATE, BURST, DURATION_S, OVERLOAD = 30, 15, 4.0, 10


@dataclass
class Load:
    sent_at: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def count(self, status: int) -> int:
        return self.statuses.count(status)


async def paced_load(url: str, per_s: float, duration_s: float, workers: int = 32) -> Load:
    """POST `url` at `per_s` for `duration_s` (each request at its scheduled time)."""
    total = int(per_s * duration_s)
    load = Load()
    schedule = iter(range(total))
    start = time.monotonic() + 0.2
    async with ClientSession(connector=TCPConnector(limit=workers)) as session:

        async def worker() -> None:
            for n in schedule:
                await asyncio.sleep(max(0.0, start + n / per_s - time.monotonic()))
                sent = time.monotonic()
                async with session.post(url, data=b'{"n": %d}' % n) as response:
                    load.bodies.append(await response.read())
                    load.sent_at.append(sent)
                    load.statuses.append(response.status)
                    load.retry_after.append(response.headers.get("Retry-After"))

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), duration_s + 30)
    return load


async def stored_events(relay: harness.Relay) -> int:
    return len(await relay.cli_json("event", "list", "--limit", "10000"))


async def test_an_input_flooded_at_ten_times_its_rate_takes_its_budget_and_429s_the_rest(
    relay: harness.Relay,
) -> None:
    limited = await relay.cli(
        "input", "limit", relay.input_id, "--rate", f"{RATE}/s", "--burst", str(BURST)
    )
    assert f"{RATE}/s, burst {BURST}" in limited.stdout
    assert f"{RATE}/s, burst {BURST}" in (await relay.cli("input", "list")).stdout
    relay.start()
    await relay.wait_ready()

    load = await paced_load(relay.input_url(), RATE * OVERLOAD, DURATION_S)

    span = max(load.sent_at) - min(load.sent_at)
    budget = BURST + RATE * span
    accepted, refused = load.count(200), load.count(429)
    offered = len(load.statuses) / span
    print(
        f"\noffered {len(load.statuses)} in {span:.2f}s ({offered:.0f}/s = "
        f"{offered / RATE:.1f}x the {RATE}/s limit, burst {BURST}): {accepted} x 200, "
        f"{refused} x 429; budget {budget:.1f}, accepted/budget {accepted / budget:.3f}; "
        f"Retry-After values {sorted(set(filter(None, load.retry_after)))}"
    )
    assert offered >= 0.8 * RATE * OVERLOAD, "the load generator could not keep the pace"
    assert accepted + refused == len(load.statuses), set(load.statuses)
    assert abs(accepted - budget) <= 0.05 * budget
    for status, retry_after, body in zip(load.statuses, load.retry_after, load.bodies, strict=True):
        if status == 429:
            assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
            assert body.startswith(b"rate limit for this input exceeded")
    assert await stored_events(relay) == accepted, "a refused webhook was stored"

    await relay.cli("input", "limit", relay.input_id, "--off")
    assert (await relay.cli_json("input", "list"))[0]["rate_limit"] is None
    entries = await relay.cli_json("audit", "list", "--action", "input.limit")
    assert [e["detail"] for e in entries] == ["none", f"{RATE}/s, burst {BURST}"]


async def test_each_source_behind_a_trusted_proxy_has_its_own_budget(
    relay: harness.Relay,
) -> None:
    relay.start("--trusted-proxy", "127.0.0.1", "--source-rate", "1/s", "--source-burst", "5")
    await relay.wait_ready()
    async with ClientSession() as session:

        async def burst_from(client: str, count: int) -> list[int]:
            statuses = []
            for _ in range(count):
                headers = {"X-Forwarded-For": client}
                async with session.post(relay.input_url(), data=b"{}", headers=headers) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert r.headers["Retry-After"] == "1"
                        assert (await r.text()).startswith("rate limit for this source exceeded")
            return statuses

        first = await burst_from("198.51.100.7", 12)
        second = await burst_from("203.0.113.9", 12)
        ipv6_same_host = await burst_from("2001:db8::1", 5) + await burst_from("2001:db8::2", 3)
    print(f"\nsource A {first}\nsource B {second}\nIPv6 /64 {ipv6_same_host}")
    assert first[:5] == [200] * 5 and first.count(429) >= 6
    assert second[:5] == [200] * 5, "one source's flood spent another's budget"
    assert ipv6_same_host[:5] == [200] * 5 and ipv6_same_host[5:] == [429] * 3
    assert await stored_events(relay) == first.count(200) + second.count(200) + 5


async def test_slow_senders_are_cut_off_at_the_deadlines_while_others_are_served(
    relay: harness.Relay,
) -> None:
    relay.start("--header-timeout", "2s", "--body-timeout", "2s")
    await relay.wait_ready()
    path = f"/in/{relay.input_id}"
    head = f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Length: 20\r\n\r\n".encode()

    started = time.monotonic()  # before either deadline starts on the server
    header_reader, header_writer = await asyncio.open_connection("127.0.0.1", relay.http_port)
    body_reader, body_writer = await asyncio.open_connection("127.0.0.1", relay.http_port)
    body_writer.write(head)
    senders = [
        asyncio.create_task(trickle(header_writer, head + b"s" * 20, 0.5)),
        asyncio.create_task(trickle(body_writer, b"slow body, not kept", 0.5)),
    ]
    cuts = [
        asyncio.create_task(until_closed(header_reader)),
        asyncio.create_task(until_closed(body_reader)),
    ]
    statuses = []
    async with ClientSession() as session:
        while not all(cut.done() for cut in cuts) and time.monotonic() - started < 10:
            async with session.post(relay.input_url(), data=b'{"normal": true}') as response:
                statuses.append(response.status)
            await asyncio.sleep(0.25)
    (header_answer, header_closed), (body_answer, body_closed) = [await cut for cut in cuts]
    header_cut, body_cut = header_closed - started, body_closed - started
    await asyncio.gather(*senders)
    for writer in (header_writer, body_writer):
        writer.close()
    print(
        f"\nheaders trickled at 1 byte/0.5s: closed after {header_cut:.2f}s "
        f"(deadline 2s, answer {header_answer[:30]!r}); body trickled: closed after "
        f"{body_cut:.2f}s (deadline 2s); meanwhile {len(statuses)} normal webhooks: "
        f"{set(statuses)}"
    )
    assert 2.0 <= header_cut < 2.8 and header_answer.startswith(b"HTTP/1.1 408 ")
    assert 2.0 <= body_cut < 2.8 and body_answer == b""
    assert len(statuses) >= 7 and set(statuses) == {200}
    assert await stored_events(relay) == len(statuses), "a cut-off request was stored"
    assert "slow_sender_closed" in relay.log_text()


async def test_headers_over_the_limit_get_431_and_nothing_is_stored(
    relay: harness.Relay,
) -> None:
    relay.start("--max-header-bytes", "1024")
    await relay.wait_ready()
    async with ClientSession() as session:
        big = {"X-Padding": "p" * 2000}
        async with session.post(relay.input_url(), data=b"{}", headers=big) as response:
            status, answer, headers = response.status, await response.text(), response.headers
        async with session.post(relay.input_url(), data=b"{}") as response:
            assert response.status == 200
    assert (status, answer) == (431, "request line or headers too large\n")
    assert "aiohttp" not in str(headers).lower()
    assert await stored_events(relay) == 1
    assert "p" * 100 not in relay.log_text()
