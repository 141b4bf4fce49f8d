"""Read deadlines and header limits (ingress/connections.py) over real loopback sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession, web

from relay_server.ingress import connections
from relay_server.settings import ReadLimits

LIMITS = ReadLimits(
    max_request_line=200,
    max_header_bytes=100,
    max_headers=10,
    header_timeout_s=1.0,
    body_timeout_s=1.0,
    idle_timeout_s=5.0,
)
REQUEST = b"POST /hook HTTP/1.1\r\nHost: relay\r\nContent-Length: 5\r\n\r\nhello"


class App:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.port = 0

    async def hook(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.Response(text="stored\n")


@pytest.fixture
async def app() -> AsyncIterator[App]:
    state = App()
    application = web.Application()
    application.router.add_post("/hook", state.hook)
    runner = connections.GuardedRunner(application, LIMITS, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.port = int(runner.addresses[0][1])
    try:
        yield state
    finally:
        await runner.cleanup()


async def until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic)."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(4096), 10):
            data += chunk
    except ConnectionError:
        pass  # reset rather than closed: closed all the same
    return data, time.monotonic()


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """Send `data` a byte at a time until done or the server hangs up."""
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every_s)
    except ConnectionError:
        return


async def test_trickled_headers_are_cut_off_at_the_deadline_while_others_are_served(
    app: App,
) -> None:
    started = time.monotonic()  # before the server's clock starts, at the connection
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    sender = asyncio.create_task(trickle(writer, REQUEST, 0.1))
    closed = asyncio.create_task(until_closed(reader))
    statuses = []
    async with ClientSession() as session:
        while not closed.done() and time.monotonic() - started < 3:
            async with session.post(f"http://127.0.0.1:{app.port}/hook", data=b"fast") as r:
                statuses.append(r.status)
            await asyncio.sleep(0.1)
    answer, closed_at = await closed
    await sender
    writer.close()
    print(f"headers trickled: closed after {closed_at - started:.2f}s, {len(statuses)} served")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert LIMITS.header_timeout_s <= closed_at - started < LIMITS.header_timeout_s + 0.5
    assert statuses and set(statuses) == {200}
    assert b"hello" not in app.bodies


async def test_a_connection_that_sends_nothing_is_closed_silently(app: App) -> None:
    started = time.monotonic()  # before the server's clock starts, at the connection
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    answer, closed_at = await until_closed(reader)
    writer.close()
    assert answer == b""
    assert LIMITS.header_timeout_s <= closed_at - started < LIMITS.header_timeout_s + 0.5


async def test_a_trickled_body_is_cut_off_and_never_handled_whole(app: App) -> None:
    started = time.monotonic()  # before the server's clock starts, at the headers
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    head, body = REQUEST.split(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n")
    sender = asyncio.create_task(trickle(writer, body, 0.4))
    answer, closed_at = await until_closed(reader)
    await sender
    writer.close()
    assert answer == b""
    assert LIMITS.body_timeout_s <= closed_at - started < LIMITS.body_timeout_s + 0.5
    assert app.bodies == []


async def test_a_kept_alive_connection_may_idle_longer_than_the_header_deadline(
    app: App,
) -> None:
    """The header clock of a next request starts with its first byte, not at idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    for _ in range(2):
        writer.write(REQUEST)
        status = await asyncio.wait_for(reader.readuntil(b"stored\n"), 5)
        assert status.startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.sleep(LIMITS.header_timeout_s + 0.5)
    writer.close()
    assert app.bodies == [b"hello", b"hello"]


async def test_a_slow_but_timely_sender_is_served(app: App) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    await trickle(writer, REQUEST, 0.01)  # about 0.7 s for the whole request
    status = await asyncio.wait_for(reader.readuntil(b"stored\n"), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200 OK\r\n")
    assert app.bodies == [b"hello"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: relay\r\n\r\n",
        b"POST /hook HTTP/1.1\r\nHost: relay\r\nX-Big: " + b"s3cr3t" * 30 + b"\r\n\r\n",
        b"POST /hook HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(20)) + b"\r\n",
    ],
    ids=["request line", "header line", "header count"],
)
async def test_headers_too_large_get_431_without_echo_or_software_name(
    app: App, request_bytes: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(request_bytes)
    answer, _ = await until_closed(reader)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 431 Request Header Fields Too Large\r\n")
    assert body == b"request line or headers too large\n"
    assert b"aiohttp" not in answer.lower() and b"python" not in answer.lower()
    assert b"s3cr3t" not in answer and b"aaaa" not in answer
    assert app.bodies == []


async def test_a_malformed_request_gets_a_bare_400(app: App) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"POST /hook HTTP/1.1\r\nHost: relay\r\nContent-Length: nope\r\n\r\n")
    answer, _ = await until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert answer.endswith(b"\r\n\r\nbad request\n")
    assert b"aiohttp" not in answer.lower()
