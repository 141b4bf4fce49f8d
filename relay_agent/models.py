"""What travels through the agent: deliveries in, outcomes out.

Protobuf messages are converted here, at the edge (`from_proto`), and never travel
further; the rest of the agent only sees these frozen objects.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, TypeAlias

from relay_proto import relay_pb2

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# A lease length of 0 in Welcome means "not said": use the protocol's documented default.
DEFAULT_LEASE_MS = 30_000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One leased try of one event for this agent."""

    lease_id: str  # "<delivery_id>.<attempt>": settles this attempt only (fencing)
    event_id: str
    bucket: str
    input_id: str
    method: str
    path: str  # path tail after /in/{input_id}: "" or starting with "/"
    query: str  # raw query string, without "?"
    headers: tuple[tuple[str, str], ...]  # as received, in order, duplicates kept
    body: bytes
    received_at: datetime.datetime  # when the server received the webhook (aware)
    attempt: int  # 1 for the first try
    lease_deadline: datetime.datetime  # server's deadline for this lease (aware)
    output: str
    replay: bool  # created by a replay of a stored event
    # A caller waits for the destination's answer: settle with an outcome carrying it.
    reply_wanted: bool = False

    def __post_init__(self) -> None:
        _check_aware("received_at", self.received_at)
        _check_aware("lease_deadline", self.lease_deadline)

    @classmethod
    def from_proto(cls, message: relay_pb2.Delivery) -> Delivery:
        return cls(
            lease_id=message.lease_id,
            event_id=message.event_id,
            bucket=message.bucket,
            input_id=message.input_id,
            method=message.method,
            path=message.path,
            query=message.query,
            headers=tuple((header.name, header.value) for header in message.headers),
            body=message.body,
            received_at=_timestamp(message, "received_at"),
            attempt=message.attempt,
            lease_deadline=_timestamp(message, "lease_deadline"),
            output=message.output,
            replay=message.replay,
            reply_wanted=message.reply_wanted,
        )

    def log_context(self) -> dict[str, Any]:
        """Fields that are safe to log: never the body, headers, query or path.

        The input id is left out too: it is the secret part of a public input URL.
        """
        return {
            "event_id": self.event_id,
            "lease_id": self.lease_id,
            "attempt": self.attempt,
            "bucket": self.bucket,
            "output": self.output,
            "method": self.method,
            "body_size": len(self.body),
            "replay": self.replay,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """The server's answer to Subscribe: what this stream was granted."""

    session_id: str
    server_version: str
    lease_ms: int  # length of every lease granted on this stream
    buckets: tuple[str, ...]
    max_in_flight: int  # credit granted: at most this many unsettled deliveries

    @classmethod
    def from_proto(cls, message: relay_pb2.Welcome) -> Welcome:
        return cls(
            session_id=message.session_id,
            server_version=message.server_version,
            lease_ms=message.lease_ms or DEFAULT_LEASE_MS,
            buckets=tuple(message.buckets),
            max_in_flight=message.max_in_flight,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LeaseLost:
    """The server no longer holds these leases for us: a settlement or extension came late."""

    lease_ids: tuple[str, ...]
    message: str

    @classmethod
    def from_proto(cls, message: relay_pb2.LeaseNotice) -> LeaseLost:
        return cls(lease_ids=tuple(message.lease_ids), message=message.message)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """The destination's HTTP answer, relayed to a caller waiting for it (reply_wanted)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    body_too_large: bool = False  # the body exceeded the cap and is left out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """The destination took the event: the delivery is done."""

    response: Response | None = None  # sent as a Reply when set


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    """The destination failed: try again later.

    retry_after_ms None leaves the delay to the bucket's backoff; 0 asks for a retry
    as soon as possible.
    """

    retry_after_ms: int | None = None
    reason: str
    response: Response | None = None  # sent as a Reply when set

    def __post_init__(self) -> None:
        if self.retry_after_ms is not None and self.retry_after_ms < 0:
            raise ValueError(f"retry_after_ms must be >= 0, not {self.retry_after_ms}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    """Poison: the event can never be delivered; dead-letter it without retrying."""

    reason: str


Outcome: TypeAlias = Ack | Nack | Reject


def _timestamp(message: relay_pb2.Delivery, field: str) -> datetime.datetime:
    # An unset timestamp is a server bug; the epoch keeps the value aware and obviously wrong.
    if not message.HasField(field):
        return _EPOCH
    # Timestamp.ToDatetime(tzinfo=UTC), in a third of its time (two per delivery).
    stamp = getattr(message, field)
    return _EPOCH + datetime.timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def _check_aware(name: str, value: datetime.datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
