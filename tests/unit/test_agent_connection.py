"""The stream's pure parts: frame coalescing, the outbox, status mapping, conversions."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import pytest
from google.protobuf import timestamp_pb2

from relay_agent import connection, errors, models, settings
from relay_proto import relay_pb2

SETTINGS = settings.AgentSettings(
    server="127.0.0.1:1", token="key9.hush", buckets=("orders", "payments"), insecure=True
)


def ack(*lease_ids: str) -> relay_pb2.AgentMessage:
    return relay_pb2.AgentMessage(ack=relay_pb2.Ack(lease_ids=lease_ids))


def extend(lease_id: str) -> relay_pb2.AgentMessage:
    return relay_pb2.AgentMessage(extend=relay_pb2.Extend(lease_ids=[lease_id], extend_ms=1))


async def test_acks_queued_together_travel_as_one_frame_after_the_others() -> None:
    outbox = connection._Outbox()
    sent = [
        outbox.put(None, acks=["a.1"]),
        outbox.put(extend("b.1")),
        outbox.put(None, acks=["b.1", "c.1"]),
    ]

    first = await outbox.__anext__()
    second = await outbox.__anext__()

    assert first == extend("b.1")
    assert second == ack("a.1", "b.1", "c.1")
    # A frame counts as written once grpc asks for the next one.
    assert sent[1].done() and not sent[0].done()
    pull = asyncio.ensure_future(outbox.__anext__())
    await asyncio.sleep(0)
    assert sent[0].done() and sent[2].done()
    outbox.end()
    with pytest.raises(StopAsyncIteration):
        await pull


async def test_failing_the_outbox_fails_every_waiting_sender() -> None:
    outbox = connection._Outbox()
    waiting = outbox.put(None, acks=["a.1"])
    outbox.fail("the server ended the stream")
    with pytest.raises(errors.ConnectionLost, match="ended the stream"):
        await waiting
    with pytest.raises(errors.ConnectionLost):
        await outbox.put(None, acks=["b.1"])


def test_subscribe_message() -> None:
    message = connection.subscribe_message(SETTINGS)
    assert list(message.subscribe.buckets) == ["orders", "payments"]
    assert message.subscribe.max_in_flight == 16


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, errors.TokenRefused),
        (grpc.StatusCode.PERMISSION_DENIED, errors.BucketRefused),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.FatalError),
        (grpc.StatusCode.UNAVAILABLE, errors.ConnectionLost),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ConnectionLost),
        (grpc.StatusCode.INTERNAL, errors.ConnectionLost),
        (grpc.StatusCode.UNIMPLEMENTED, errors.ConnectionLost),
    ],
)
def test_status_codes_map_to_agent_errors(code: grpc.StatusCode, expected: type) -> None:
    error = connection.error_from_status(code, "details", SETTINGS)
    assert type(error) is expected
    assert "hush" not in str(error)


def test_token_refused_carries_the_key_id() -> None:
    error = connection.error_from_status(grpc.StatusCode.UNAUTHENTICATED, "revoked", SETTINGS)
    assert isinstance(error, errors.TokenRefused) and error.key_id == "key9"


@pytest.mark.parametrize(
    ("details", "buckets", "expected"),
    [
        ("bucket 'payments' is not in this token's scope", ("orders", "payments"), "payments"),
        ('unknown bucket "orders"', ("orders", "payments"), "orders"),
        ("not allowed", ("orders",), "orders"),
        ("not allowed", ("orders", "payments"), None),
        ("bucket orders-eu refused", ("orders", "orders-eu"), "orders-eu"),
    ],
)
def test_the_refused_bucket_is_found_in_the_details(
    details: str, buckets: tuple[str, ...], expected: str | None
) -> None:
    assert connection.named_bucket(details, buckets) == expected


@pytest.mark.parametrize(
    ("ms", "wire"), [(None, 0), (0, 1), (1, 1), (7000, 7000), (2**40, 2**32 - 1)]
)
def test_retry_after_on_the_wire(ms: int | None, wire: int) -> None:
    assert connection.wire_retry_after_ms(ms) == wire


def test_delivery_from_proto() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=1_714_564_800)
    message = relay_pb2.Delivery(
        lease_id="d1.2",
        event_id="e1",
        bucket="orders",
        input_id="in-1",
        method="POST",
        path="/x",
        query="a=1",
        headers=[relay_pb2.Header(name="A", value="1"), relay_pb2.Header(name="A", value="2")],
        body=b"\x00\xff",
        received_at=stamp,
        attempt=2,
        output="default",
        replay=True,
    )
    delivery = models.Delivery.from_proto(message)
    assert delivery.headers == (("A", "1"), ("A", "2"))
    assert delivery.body == b"\x00\xff"
    assert delivery.received_at == datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    assert delivery.lease_deadline.tzinfo is not None  # unset: the epoch, still aware
    assert delivery.attempt == 2 and delivery.replay is True
    context = delivery.log_context()
    assert context["lease_id"] == "d1.2" and context["event_id"] == "e1"
    assert not {"body", "headers", "query", "path", "input_id"} & context.keys()


def test_naive_datetimes_are_refused() -> None:
    naive = datetime.datetime(2024, 5, 1, 12, 0)
    message = models.Delivery.from_proto(relay_pb2.Delivery(lease_id="d.1"))
    with pytest.raises(ValueError, match="timezone-aware"):
        models.Delivery(
            **{field: getattr(message, field) for field in models.Delivery.__dataclass_fields__}
            | {"received_at": naive}
        )


def test_welcome_without_a_lease_length_gets_the_default() -> None:
    welcome = models.Welcome.from_proto(relay_pb2.Welcome(session_id="s", max_in_flight=4))
    assert welcome.lease_ms == models.DEFAULT_LEASE_MS
    assert welcome.max_in_flight == 4
