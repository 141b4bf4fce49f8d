"""Agent stream limits over real gRPC: streams per token, in-flight per stream, frame size."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest

from relay_proto import relay_pb2
from relay_server import crypto, settings
from relay_server.store import database
from tests.integration.conftest import FAST, Running, serving
from tests.integration.test_agent_stream import RawAgent, ingest, status_of

STREAMS_PER_TOKEN = 2
MAX_IN_FLIGHT = 3
MAX_FRAME_BYTES = 64 * 1024


@pytest.fixture
async def limited(
    database_url: str, tmp_path: pathlib.Path, keyring: crypto.KeyRing
) -> AsyncIterator[Running]:
    config = settings.ServerSettings(
        database=database.DatabaseSettings(url=database_url),
        key_file=tmp_path / "unused.key",
        ingress=settings.IngressSettings(listen="127.0.0.1:0"),
        grpc=settings.GrpcSettings(
            listen="127.0.0.1:0",
            max_streams_per_token=STREAMS_PER_TOKEN,
            max_in_flight=MAX_IN_FLIGHT,
            max_frame_bytes=MAX_FRAME_BYTES,
        ),
        dispatch=settings.DispatchSettings(lease_ms=5000, poll_interval_s=0.05, retry=FAST),
    )
    async with serving(config, keyring) as running:
        yield running


async def subscribed(running: Running, **subscribe: object) -> RawAgent:
    agent = RawAgent(running.grpc_target, running.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], **subscribe))  # type: ignore[arg-type]
    return agent


async def test_one_stream_past_the_token_limit_is_refused_until_one_closes(
    limited: Running,
) -> None:
    key_id = limited.installation.token.split(".")[0]
    held = [await subscribed(limited) for _ in range(STREAMS_PER_TOKEN)]
    for agent in held:
        assert (await agent.read()).WhichOneof("kind") == "welcome"

    extra = await subscribed(limited)
    code, details = await status_of(extra)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"token {key_id} already has {STREAMS_PER_TOKEN} open streams" in details
    assert "--grpc-max-streams-per-token" in details

    await held.pop().close()
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # the server notices the cancelled stream shortly after
        again = await subscribed(limited)
        try:
            assert (await again.read()).WhichOneof("kind") == "welcome"
            break
        except grpc.aio.AioRpcError as exc:
            await again.close()
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert asyncio.get_running_loop().time() < deadline, "slot never came back"
            await asyncio.sleep(0.1)
    for agent in (*held, again):
        await agent.close()


async def test_a_stream_that_fails_gives_its_slot_back(limited: Running) -> None:
    for _ in range(STREAMS_PER_TOKEN + 2):  # each one refused after authentication
        agent = RawAgent(limited.grpc_target, limited.installation.token)
        agent.send(ack=relay_pb2.Ack(lease_ids=["x"]))
        assert (await status_of(agent))[0] is grpc.StatusCode.INVALID_ARGUMENT
    agent = await subscribed(limited)
    assert (await agent.read()).WhichOneof("kind") == "welcome"
    await agent.close()


async def test_in_flight_is_capped_whatever_the_agent_asks(limited: Running) -> None:
    for n in range(MAX_IN_FLIGHT + 3):
        await ingest(limited, f"{n}".encode())
    agent = await subscribed(limited, max_in_flight=100)
    assert (await agent.read()).welcome.max_in_flight == MAX_IN_FLIGHT
    pushed = list((await agent.read()).deliveries.deliveries)
    assert len(pushed) == MAX_IN_FLIGHT
    with pytest.raises(TimeoutError):
        await agent.read(timeout=0.5)  # no more while those are held
    await agent.close()


async def test_a_frame_over_the_size_limit_ends_the_stream(limited: Running) -> None:
    agent = await subscribed(limited)
    assert (await agent.read()).WhichOneof("kind") == "welcome"
    agent.send(nack=relay_pb2.Nack(lease_id="x", reason="r" * (MAX_FRAME_BYTES + 1)))
    code, details = await status_of(agent)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_FRAME_BYTES) in details
