"""The agent against a scripted in-process AgentRelay server and a real HTTP target.

Everything listens on 127.0.0.1, port 0. Each test scripts what the fake server does
on each Connect stream and checks the frames the agent sends back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.protobuf import timestamp_pb2

import relay_agent
from relay_agent import agent, connection, errors, settings
from relay_agent.destinations import http
from relay_proto import relay_pb2, relay_pb2_grpc
from tests import tls

TOKEN = "key1.s3cr3t-value"
WAIT_S = 5.0


class FakeStream:
    """One Connect call as the fake server sees it."""

    def __init__(self, requests: AsyncIterator[relay_pb2.AgentMessage], context) -> None:
        self.context = context
        self.metadata = dict(context.invocation_metadata())
        self.frames: list[relay_pb2.AgentMessage] = []
        self.credits: list[int] = []  # Credit frames, kept apart from the settlements
        self._requests = requests

    async def recv(self) -> relay_pb2.AgentMessage | None:
        """The agent's next frame other than Credit, or None once it half-closes."""
        while (frame := await anext(self._requests, None)) is not None:
            if frame.WhichOneof("kind") == "credit":
                self.credits.append(frame.credit.max_in_flight)
                continue
            self.frames.append(frame)
            return frame
        return None

    async def send(self, message: relay_pb2.ServerMessage) -> None:
        await self.context.write(message)

    async def welcome(self, *, lease_ms: int = 30_000, max_in_flight: int = 16) -> None:
        await self.recv()
        welcome = relay_pb2.Welcome(
            session_id=f"session-{id(self)}",
            server_version="fake",
            lease_ms=lease_ms,
            buckets=self.frames[0].subscribe.buckets,
            max_in_flight=max_in_flight,
        )
        await self.send(relay_pb2.ServerMessage(welcome=welcome))

    async def deliver(self, *deliveries: relay_pb2.Delivery) -> None:
        batch = relay_pb2.DeliveryBatch(deliveries=deliveries)
        await self.send(relay_pb2.ServerMessage(deliveries=batch))

    async def drain(self) -> None:
        """Read until the agent half-closes; the stream then ends."""
        while await self.recv() is not None:
            pass


Script = Callable[[FakeStream], Awaitable[None]]


class FakeRelay(relay_pb2_grpc.AgentRelayServicer):
    """Runs the test's script on every Connect stream."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.streams: list[FakeStream] = []
        self.opened: asyncio.Queue[FakeStream] = asyncio.Queue()

    async def Connect(self, request_iterator, context) -> None:  # the gRPC method name
        stream = FakeStream(request_iterator, context)
        self.streams.append(stream)
        self.opened.put_nowait(stream)
        await self.script(stream)


@pytest.fixture
async def start_relay() -> AsyncIterator[Callable[[Script], Awaitable[tuple[FakeRelay, int]]]]:
    servers: list[grpc.aio.Server] = []

    async def start(script: Script) -> tuple[FakeRelay, int]:
        relay = FakeRelay(script)
        server = grpc.aio.server()
        relay_pb2_grpc.add_AgentRelayServicer_to_server(relay, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return relay, port

    yield start
    for server in servers:
        await server.stop(grace=None)


class Target:
    """A real HTTP server that records what it receives and answers as told."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self.status = 200
        self.headers: dict[str, str] = {}
        self.delay_s = 0.0
        self.concurrent = 0
        self.max_concurrent = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            return await self._answer(request)
        finally:
            self.concurrent -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.put_nowait(
            {"method": request.method, "path_qs": request.raw_path, "headers": request.headers}
            | {"body": body}
        )
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status, headers=self.headers)


@pytest.fixture
async def target() -> AsyncIterator[tuple[Target, str]]:
    recorder = Target()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield recorder, f"http://127.0.0.1:{server.port}/hooks"
    finally:
        await server.close()


def make_delivery(lease_id: str = "d1.1", **fields: object) -> relay_pb2.Delivery:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC))
    values: dict[str, object] = {
        "lease_id": lease_id,
        "event_id": "evt-1",
        "bucket": "orders",
        "input_id": "in-1",
        "method": "POST",
        "path": "/github",
        "query": "a=1&a=2",
        "headers": [relay_pb2.Header(name="Content-Type", value="application/json")],
        "body": b'{"ok": true}',
        "received_at": stamp,
        "attempt": 1,
        "lease_deadline": stamp,
        "output": "default",
    }
    return relay_pb2.Delivery(**(values | fields))


def agent_settings(port: int, **overrides: object) -> settings.AgentSettings:
    values: dict[str, object] = {
        "server": f"127.0.0.1:{port}",
        "token": TOKEN,
        "buckets": ("orders",),
        "insecure": True,
        "agent_name": "test-agent",
        "shutdown_grace_s": 1.0,
        "reconnect": settings.ReconnectPolicy(initial_s=0.01, max_s=0.05),
    }
    return settings.AgentSettings(**(values | overrides))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_agent(port: int, url: str, **overrides: object) -> AsyncIterator[agent.Agent]:
    destination = http.HttpDestination(settings.HttpDestinationSettings(url=url, timeout_s=5))
    relay_agent_ = agent.Agent(agent_settings(port, **overrides), destination)
    task = asyncio.create_task(relay_agent_.run(), name="test-agent")
    try:
        yield relay_agent_
    finally:
        relay_agent_.stop()
        # A stop waits up to the connection's close timeout for the server to end the
        # stream: the agent is done within that, plus the test's own margin. (Once in
        # ~3 full runs on a loaded VM, the TLS test's fake server ended it only then.)
        await asyncio.wait_for(task, connection.CLOSE_TIMEOUT_S + WAIT_S)
        await destination.close()


async def next_frame(stream: FakeStream) -> relay_pb2.AgentMessage | None:
    return await asyncio.wait_for(stream.recv(), WAIT_S)


async def test_forwards_a_delivery_and_acks_it(start_relay, target) -> None:
    recorder, url = target
    results: asyncio.Queue[relay_pb2.AgentMessage | None] = asyncio.Queue()

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await stream.deliver(make_delivery())
        results.put_nowait(await stream.recv())
        await stream.drain()

    relay, port = await start_relay(script)
    async with running_agent(port, url):
        ack = await asyncio.wait_for(results.get(), WAIT_S)
        request = await asyncio.wait_for(recorder.requests.get(), WAIT_S)

    stream = relay.streams[0]
    assert stream.metadata["authorization"] == f"Bearer {TOKEN}"
    subscribe = stream.frames[0]
    assert subscribe.WhichOneof("kind") == "subscribe"
    assert list(subscribe.subscribe.buckets) == ["orders"]
    assert subscribe.subscribe.max_in_flight == 16
    assert subscribe.subscribe.agent_name == "test-agent"
    assert subscribe.subscribe.version == relay_agent.__version__
    assert ack is not None and list(ack.ack.lease_ids) == ["d1.1"]
    assert request["method"] == "POST"
    assert request["path_qs"] == "/hooks/github?a=1&a=2"
    assert request["body"] == b'{"ok": true}'
    assert request["headers"]["X-Stowhook-Event-Id"] == "evt-1"  # type: ignore[index]


async def test_target_error_nacks_with_its_retry_after(start_relay, target) -> None:
    recorder, url = target
    recorder.status, recorder.headers = 500, {"Retry-After": "7"}
    results: asyncio.Queue[relay_pb2.AgentMessage | None] = asyncio.Queue()

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await stream.deliver(make_delivery())
        results.put_nowait(await stream.recv())
        await stream.drain()

    _, port = await start_relay(script)
    async with running_agent(port, url):
        nack = await asyncio.wait_for(results.get(), WAIT_S)

    assert nack is not None and nack.WhichOneof("kind") == "nack"
    assert nack.nack.lease_id == "d1.1"
    assert nack.nack.reason == "HTTP 500"
    assert nack.nack.retry_after_ms == 7000


async def test_unauthenticated_raises_token_refused(start_relay, target) -> None:
    async def script(stream: FakeStream) -> None:
        await stream.context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")

    _, port = await start_relay(script)
    destination = http.HttpDestination(settings.HttpDestinationSettings(url=target[1]))
    with pytest.raises(errors.TokenRefused) as caught:
        await asyncio.wait_for(agent.Agent(agent_settings(port), destination).run(), WAIT_S)
    await destination.close()
    assert caught.value.key_id == "key1"
    assert "s3cr3t" not in str(caught.value)


async def test_permission_denied_raises_bucket_refused(start_relay, target) -> None:
    async def script(stream: FakeStream) -> None:
        await stream.context.abort(
            grpc.StatusCode.PERMISSION_DENIED, "bucket 'payments' is not in this token's scope"
        )

    _, port = await start_relay(script)
    destination = http.HttpDestination(settings.HttpDestinationSettings(url=target[1]))
    relay = agent.Agent(agent_settings(port, buckets=("orders", "payments")), destination)
    with pytest.raises(errors.BucketRefused) as caught:
        await asyncio.wait_for(relay.run(), WAIT_S)
    await destination.close()
    assert caught.value.bucket == "payments"
    assert str(caught.value) == "bucket 'payments' is not in this token's scope"


async def test_reconnects_when_the_stream_ends(start_relay, target) -> None:
    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        if len(relay.streams) == 1:
            return  # end the first stream right after Welcome
        await stream.drain()

    relay, port = await start_relay(script)
    async with running_agent(port, target[1]):
        first = await asyncio.wait_for(relay.opened.get(), WAIT_S)
        second = await asyncio.wait_for(relay.opened.get(), WAIT_S)
        await asyncio.wait_for(_until(lambda: len(second.frames) >= 1), WAIT_S)
    assert first is not second
    assert second.frames[0].WhichOneof("kind") == "subscribe"
    assert second.metadata["authorization"] == f"Bearer {TOKEN}"


async def test_reconnects_while_the_server_is_unreachable(target) -> None:
    # Nothing listens on this port: every attempt fails with UNAVAILABLE and is retried.
    with contextlib.closing(__import__("socket").socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running_agent(port, target[1]) as relay:
        await asyncio.sleep(0.2)
    assert relay is not None  # run() kept retrying and returned after stop()


async def test_long_delivery_is_extended_and_a_lost_lease_is_not_settled(
    start_relay, target
) -> None:
    recorder, url = target
    recorder.delay_s = 3.0
    extend_seen = asyncio.Event()
    after_notice: list[relay_pb2.AgentMessage] = []

    async def script(stream: FakeStream) -> None:
        await stream.welcome(lease_ms=300)
        await stream.deliver(make_delivery("d7.2"))
        frame = await stream.recv()
        assert frame is not None and frame.WhichOneof("kind") == "extend"
        assert list(frame.extend.lease_ids) == ["d7.2"] and frame.extend.extend_ms == 300
        extend_seen.set()
        notice = relay_pb2.LeaseNotice(
            lease_ids=["d7.2"], code=relay_pb2.LeaseNotice.LEASE_LOST, message="expired"
        )
        await stream.send(relay_pb2.ServerMessage(notice=notice))
        while (frame := await stream.recv()) is not None:
            after_notice.append(frame)

    _, port = await start_relay(script)
    async with running_agent(port, url):
        await asyncio.wait_for(extend_seen.wait(), WAIT_S)
        await asyncio.sleep(0.4)  # more than one heartbeat period
    assert [frame.WhichOneof("kind") for frame in after_notice] == []


async def test_stop_nacks_what_does_not_finish_within_the_grace(start_relay, target) -> None:
    recorder, url = target
    recorder.delay_s = 5.0
    frames: list[relay_pb2.AgentMessage] = []
    credits: list[int] = []

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await stream.deliver(make_delivery("d9.1"))
        while (frame := await stream.recv()) is not None:
            frames.append(frame)
        credits.extend(stream.credits)

    _, port = await start_relay(script)
    async with running_agent(port, url, shutdown_grace_s=0.1):
        await asyncio.wait_for(recorder.requests.get(), WAIT_S)
    assert [frame.WhichOneof("kind") for frame in frames] == ["nack"]
    assert frames[0].nack.lease_id == "d9.1"
    assert frames[0].nack.reason == "agent shutting down"
    assert frames[0].nack.retry_after_ms == 1
    assert credits == [0], "the agent pauses the stream once, before it releases"


async def test_stop_lets_a_short_delivery_finish_and_ack(start_relay, target) -> None:
    recorder, url = target
    recorder.delay_s = 0.2
    frames: list[relay_pb2.AgentMessage] = []

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await stream.deliver(make_delivery("d3.1"))
        while (frame := await stream.recv()) is not None:
            frames.append(frame)

    _, port = await start_relay(script)
    async with running_agent(port, url, shutdown_grace_s=2.0):
        await asyncio.wait_for(recorder.requests.get(), WAIT_S)
    assert [list(frame.ack.lease_ids) for frame in frames] == [["d3.1"]]


async def test_never_more_deliveries_at_once_than_granted(start_relay, target) -> None:
    recorder, url = target
    recorder.delay_s = 0.15
    acked: list[str] = []

    async def script(stream: FakeStream) -> None:
        await stream.welcome(max_in_flight=1)
        await stream.deliver(make_delivery("d1.1"), make_delivery("d2.1"))
        while (frame := await stream.recv()) is not None:
            acked.extend(frame.ack.lease_ids)

    _, port = await start_relay(script)
    async with running_agent(port, url):
        await asyncio.wait_for(_until(lambda: len(acked) == 2), WAIT_S)
    assert recorder.max_concurrent == 1
    assert sorted(acked) == ["d1.1", "d2.1"]


async def test_cancelling_run_stops_gracefully_then_reraises(start_relay, target) -> None:
    recorder, url = target
    recorder.delay_s = 0.2
    frames: list[relay_pb2.AgentMessage] = []

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await stream.deliver(make_delivery("d5.1"))
        while (frame := await stream.recv()) is not None:
            frames.append(frame)

    _, port = await start_relay(script)
    async with http.HttpDestination(settings.HttpDestinationSettings(url=url)) as destination:
        task = asyncio.create_task(agent.Agent(agent_settings(port), destination).run())
        await asyncio.wait_for(recorder.requests.get(), WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT_S)
    # The delivery in progress finished within the grace and was acked before closing.
    assert [list(frame.ack.lease_ids) for frame in frames] == [["d5.1"]]


async def test_an_agent_runs_once(target) -> None:
    async with http.HttpDestination(settings.HttpDestinationSettings(url=target[1])) as dest:
        relay = agent.Agent(agent_settings(1), dest)
        relay.stop()
        relay.stop()  # idempotent
        await asyncio.wait_for(relay.run(), WAIT_S)  # stopped before it started: returns
        with pytest.raises(RuntimeError, match="already been started"):
            await relay.run()


async def test_tls_with_a_private_ca_and_server_name(tmp_path, target) -> None:
    pki = tls.Authority.create(tmp_path)
    server_files = pki.issue("server", "relay.test")
    welcomed = asyncio.Event()

    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        welcomed.set()
        await stream.drain()

    relay = FakeRelay(script)
    server = grpc.aio.server()
    relay_pb2_grpc.add_AgentRelayServicer_to_server(relay, server)
    credentials = grpc.ssl_server_credentials(
        [(server_files.key.read_bytes(), server_files.cert.read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        options = {"insecure": False, "ca_file": pki.ca_file, "tls_server_name": "relay.test"}
        async with running_agent(port, target[1], **options):
            await asyncio.wait_for(welcomed.wait(), WAIT_S)
        assert relay.streams[0].metadata["authorization"] == f"Bearer {TOKEN}"
    finally:
        await server.stop(grace=None)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


# ---- the relay-agent command, as a real process ---------------------------------------


async def run_cli(port: int, *extra: str) -> asyncio.subprocess.Process:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STOWHOOK_")}
    env["STOWHOOK_TOKEN"] = TOKEN
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay_agent",
        "run",
        "--server",
        f"127.0.0.1:{port}",
        "--insecure",
        "--bucket",
        "orders",
        "--forward",
        "http://127.0.0.1:9/hooks",
        "--log-format",
        "json",
        *extra,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_cli_exits_3_when_the_token_is_refused(start_relay) -> None:
    async def script(stream: FakeStream) -> None:
        await stream.context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")

    _, port = await start_relay(script)
    process = await run_cli(port)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 3
    assert (
        "error: the server refused the token (key id key1): check --token / STOWHOOK_TOKEN"
        in stderr.decode()
    )
    assert "s3cr3t" not in stderr.decode()


async def test_cli_exits_4_when_a_bucket_is_refused(start_relay) -> None:
    async def script(stream: FakeStream) -> None:
        await stream.context.abort(
            grpc.StatusCode.PERMISSION_DENIED, "bucket 'orders' is not in this token's scope"
        )

    _, port = await start_relay(script)
    process = await run_cli(port)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 4
    assert "error: bucket 'orders' is not in this token's scope" in stderr.decode()


async def test_cli_stops_cleanly_on_sigterm(start_relay) -> None:
    async def script(stream: FakeStream) -> None:
        await stream.welcome()
        await stream.drain()

    relay, port = await start_relay(script)
    process = await run_cli(port)
    stream = await asyncio.wait_for(relay.opened.get(), 10)
    await asyncio.wait_for(_until(lambda: len(stream.frames) >= 1), WAIT_S)
    await asyncio.sleep(0.1)  # let the agent log "connected"
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    log = stderr.decode()
    for event in ("connecting", "connected", "shutting_down", "stopped"):
        assert f'"event": "{event}"' in log
    assert "s3cr3t" not in log
