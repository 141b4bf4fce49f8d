"""The wire seam: what the server packs into a Delivery frame is what the agent reads."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from relay_agent import models as agent_models
from relay_proto import relay_pb2
from relay_server import models
from relay_server.dispatch import frames

# Timestamp's own range: 0001-01-01 to 9999-12-31, UTC.
aware = st.datetimes(
    min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.just(dt.UTC)
)
offsets = st.builds(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes)), st.integers(-23 * 60, 23 * 60)
)


def library_stamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


@given(value=aware, zone=offsets)
def test_a_timestamp_is_what_protobuf_itself_makes(value: dt.datetime, zone: dt.tzinfo) -> None:
    local = value.astimezone(zone)
    assert frames.timestamp(local) == library_stamp(local)
    naive = value.replace(tzinfo=None)  # protobuf's rule: naive means UTC
    assert frames.timestamp(naive) == library_stamp(naive)


def lease(received_at: dt.datetime, deadline: dt.datetime) -> models.Lease:
    return models.Lease(
        lease_id="0193a.2",
        delivery_id="0193a",
        attempt=2,
        deadline=deadline,
        event_id="0193e",
        bucket="orders",
        output="default",
        input_id="in_1",
        method="POST",
        path="/hooks/a",
        query="x=1&x=2",
        headers=(("Content-Type", "application/json"), ("X-Dup", "1"), ("X-Dup", "2")),
        body=b'{"id": 1}',
        received_at=received_at,
        replay=True,
    )


@given(received_at=aware, deadline=aware)
def test_the_agent_reads_back_every_field_the_server_sent(
    received_at: dt.datetime, deadline: dt.datetime
) -> None:
    sent = lease(received_at, deadline)
    frame = relay_pb2.Delivery.FromString(frames.delivery(sent).SerializeToString())

    got = agent_models.Delivery.from_proto(frame)

    assert got.received_at == received_at and got.lease_deadline == deadline
    assert got.received_at.tzinfo is not None
    assert (got.lease_id, got.event_id, got.attempt, got.replay) == ("0193a.2", "0193e", 2, True)
    assert (got.method, got.path, got.query, got.body) == ("POST", "/hooks/a", "x=1&x=2", sent.body)
    assert got.headers == sent.headers
    assert (got.bucket, got.output, got.input_id) == ("orders", "default", "in_1")
    # And the library's own reading agrees with ours.
    assert frame.received_at.ToDatetime(tzinfo=dt.UTC) == received_at
