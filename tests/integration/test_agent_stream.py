"""AgentRelay over a real gRPC connection to an in-process server, with a raw client."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay_proto import relay_pb2, relay_pb2_grpc
from relay_server import ids, models
from tests.integration.conftest import Running


class RawAgent:
    """Speaks the wire protocol directly, frame by frame."""

    def __init__(self, target: str, token: str | None) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.outgoing: asyncio.Queue[relay_pb2.AgentMessage | None] = asyncio.Queue()
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.call = relay_pb2_grpc.AgentRelayStub(self.channel).Connect(
            self._requests(), metadata=metadata
        )
        # Cancelling a read cancels the whole call in grpc.aio: read in one task instead.
        self.incoming: asyncio.Queue[relay_pb2.ServerMessage | grpc.aio.AioRpcError] = (
            asyncio.Queue()
        )
        self.reader = asyncio.create_task(self._read_all(), name="raw-agent-read")

    async def _read_all(self) -> None:
        try:
            async for message in self.call:
                self.incoming.put_nowait(message)
        except grpc.aio.AioRpcError as exc:
            self.incoming.put_nowait(exc)

    async def _requests(self) -> AsyncIterator[relay_pb2.AgentMessage]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    def send(self, **frame: object) -> None:
        self.outgoing.put_nowait(relay_pb2.AgentMessage(**frame))  # type: ignore[arg-type]

    async def read(self, timeout: float = 5) -> relay_pb2.ServerMessage:
        item = await asyncio.wait_for(self.incoming.get(), timeout)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


async def ingest(running: Running, body: bytes) -> None:
    inst = running.installation
    await running.relay.store.ingest(
        models.IncomingEvent(
            id=ids.new_id(),
            route=inst.route,
            method="POST",
            path="",
            query="",
            headers=(),
            body=body,
            received_at=dt.datetime.now(dt.UTC),
            source="test",
        )
    )
    running.relay.hub.notify(inst.route.output_ids)


async def status_of(agent: RawAgent) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.read()
    await agent.close()
    return caught.value.code(), caught.value.details() or ""


async def test_a_missing_token_is_unauthenticated(running_server: Running) -> None:
    agent = RawAgent(running_server.grpc_target, None)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"]))
    assert (await status_of(agent))[0] is grpc.StatusCode.UNAUTHENTICATED


async def test_a_wrong_secret_is_unauthenticated(running_server: Running) -> None:
    key_id = running_server.installation.token.split(".")[0]
    agent = RawAgent(running_server.grpc_target, f"{key_id}.wrong")
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"]))
    assert await status_of(agent) == (grpc.StatusCode.UNAUTHENTICATED, "token refused")


async def test_a_first_frame_other_than_subscribe_is_invalid(running_server: Running) -> None:
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(ack=relay_pb2.Ack(lease_ids=["x"]))
    code, details = await status_of(agent)
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the first frame must be Subscribe",
    )


async def test_a_bucket_outside_the_scope_is_denied_by_name(running_server: Running) -> None:
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders", "payroll"]))
    code, details = await status_of(agent)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert details == "bucket 'payroll' is not in this token's scope"


async def test_credit_limits_what_is_pushed_and_acks_return_it(running_server: Running) -> None:
    for n in range(5):
        await ingest(running_server, f"{n}".encode())
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], max_in_flight=2))
    welcome = (await agent.read()).welcome
    assert (welcome.max_in_flight, list(welcome.buckets), welcome.lease_ms) == (2, ["orders"], 1000)
    first = list((await agent.read()).deliveries.deliveries)
    assert [d.body for d in first] == [b"0", b"1"]
    with pytest.raises(TimeoutError):
        await agent.read(timeout=0.3)  # no credit left
    agent.send(ack=relay_pb2.Ack(lease_ids=[d.lease_id for d in first]))
    second = list((await agent.read()).deliveries.deliveries)
    assert [d.body for d in second] == [b"2", b"3"]
    await agent.close()


async def test_an_unextended_lease_expires_and_a_late_ack_is_refused(
    running_server: Running,
) -> None:
    await ingest(running_server, b"slow")
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], max_in_flight=1))
    await agent.read()
    (held,) = (await agent.read()).deliveries.deliveries
    # 1 s lease, no Extend: the reaper takes it back and it comes again as attempt 2.
    (again,) = (await agent.read(timeout=5)).deliveries.deliveries
    assert (again.event_id, again.attempt) == (held.event_id, 2)
    agent.send(ack=relay_pb2.Ack(lease_ids=[held.lease_id]))
    notice = (await agent.read()).notice
    assert (list(notice.lease_ids), notice.code) == (
        [held.lease_id],
        relay_pb2.LeaseNotice.LEASE_LOST,
    )
    agent.send(ack=relay_pb2.Ack(lease_ids=[again.lease_id]))
    await asyncio.sleep(0.2)
    await agent.close()
    detail = await running_server.relay.store.get_event(
        running_server.installation.account.id, held.event_id
    )
    assert detail.summary.deliveries[0].state is models.DeliveryState.DELIVERED
    assert [a.outcome for a in detail.attempts] == [
        models.Outcome.LEASE_EXPIRED,
        models.Outcome.ACK,
    ]


async def test_extend_keeps_a_lease_past_its_first_deadline(running_server: Running) -> None:
    await ingest(running_server, b"long job")
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], max_in_flight=1))
    await agent.read()
    (held,) = (await agent.read()).deliveries.deliveries
    for _ in range(4):
        await asyncio.sleep(0.4)
        agent.send(extend=relay_pb2.Extend(lease_ids=[held.lease_id], extend_ms=1000))
    agent.send(ack=relay_pb2.Ack(lease_ids=[held.lease_id]))
    with pytest.raises(TimeoutError):
        await agent.read(timeout=0.5)  # neither a notice nor a redelivery
    await agent.close()


async def test_health_and_reflection_are_served(running_server: Running) -> None:
    async with grpc.aio.insecure_channel(running_server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(
            health_pb2.HealthCheckRequest(service="stowhook.relay.v1.AgentRelay")
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "stowhook.relay.v1.AgentRelay" in names


async def test_a_bad_frame_mid_stream_ends_it_and_returns_its_leases(
    running_server: Running,
) -> None:
    await ingest(running_server, b"held when the agent misbehaves")
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], max_in_flight=1))
    await agent.read()
    (held,) = (await agent.read()).deliveries.deliveries
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"]))
    code, details = await status_of(agent)
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "unexpected subscribe frame after Subscribe",
    )
    detail = await running_server.relay.store.get_event(
        running_server.installation.account.id, held.event_id
    )
    assert detail.summary.deliveries[0].state is models.DeliveryState.PENDING
    assert [a.outcome for a in detail.attempts] == [models.Outcome.DISCONNECTED]


async def test_credit_zero_pauses_the_stream_so_released_events_stay_released(
    running_server: Running,
) -> None:
    for n in range(3):
        await ingest(running_server, f"{n}".encode())
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], max_in_flight=2))
    await agent.read()
    held = list((await agent.read()).deliveries.deliveries)
    assert len(held) == 2
    agent.send(credit=relay_pb2.Credit(max_in_flight=0))
    for delivery in held:
        agent.send(nack=relay_pb2.Nack(lease_id=delivery.lease_id, retry_after_ms=1))
    with pytest.raises(TimeoutError):
        await agent.read(timeout=0.5)  # paused: neither the third nor the released two
    agent.send(credit=relay_pb2.Credit(max_in_flight=5))  # capped at the 2 granted
    again = list((await agent.read()).deliveries.deliveries)
    assert len(again) == 2
    await agent.close()


async def test_an_ack_right_behind_an_extend_of_the_same_lease_brings_no_lost_notice(
    running_server: Running,
) -> None:
    """Frames apply concurrently, so the ACK may commit before the Extend reads the lease:
    the agent settled it itself, and hearing "lease lost" for it would be a false alarm."""
    for n in range(20):
        await ingest(running_server, f"job {n}".encode())
    agent = RawAgent(running_server.grpc_target, running_server.installation.token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], max_in_flight=20))
    await agent.read()
    leases: list[str] = []
    while len(leases) < 20:
        leases += [d.lease_id for d in (await agent.read()).deliveries.deliveries]
    for lease_id in leases:
        agent.send(extend=relay_pb2.Extend(lease_ids=[lease_id], extend_ms=5000))
        agent.send(ack=relay_pb2.Ack(lease_ids=[lease_id]))
    with pytest.raises(TimeoutError):
        await agent.read(timeout=1.0)  # neither a notice nor a redelivery
    async with running_server.installation.store.db.read() as conn:
        states = await conn.execute(
            sa.text("SELECT state, count(*) FROM deliveries GROUP BY state")
        )
        assert dict(states.all()) == {"delivered": 20}
    await agent.close()
