"""Domain objects: frozen, typed, converted to rows and frames only at the edges."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from relay_server import ids

Headers = tuple[tuple[str, str], ...]


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # waiting for an agent (possibly until available_at)
    LEASED = "leased"  # handed to an agent; lease_expires_at bounds the attempt
    DELIVERED = "delivered"  # acknowledged: done
    DEAD = "dead"  # out of attempts or age, or rejected: in the dead-letter queue


class Outcome(enum.StrEnum):
    ACK = "ack"  # the destination took it
    NACK = "nack"  # the destination failed; retry later
    REJECT = "reject"  # poison: straight to DEAD
    LEASE_EXPIRED = "lease_expired"  # the agent neither settled nor extended in time
    DISCONNECTED = "disconnected"  # the agent's stream ended while it held the lease
    RELEASED = "released"  # the server handed the lease back (shutting down, or unpushed)


class OutputKind(enum.StrEnum):
    AGENT = "agent"  # consumed by agents over the stream


HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# Headers whose value names one provider event; a bucket deduplicates on the first present.
DEFAULT_DEDUP_HEADERS = ("X-Provider-Event-Id",)
DEDUP_PRESETS = {
    "github": "X-GitHub-Delivery",
    "shopify": "X-Shopify-Webhook-Id",
    "standard-webhooks": "webhook-id",
    "svix": "svix-id",
}
MAX_DEDUP_HEADERS = 8
MAX_DEDUP_VALUE = 1024  # longer values are not ids: such a request is not deduplicated


def dedup_key(names: tuple[str, ...], headers: Headers) -> str | None:
    """The bucket-local identity of a provider event, or None when it carries none.

    The first of `names` (case-insensitive) present with a non-empty value wins; the
    stored key is a SHA-256 of header name and value, so no header value is kept in clear.
    """
    if not names:
        return None
    present: dict[str, str] = {}
    for name, value in headers:
        present.setdefault(name.lower(), value)
    for name in names:
        value = present.get(name.lower(), "").strip()
        if value and len(value) <= MAX_DEDUP_VALUE:
            return hashlib.sha256(f"{name.lower()}\n{value}".encode()).hexdigest()
    return None


def from_ms(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value / 1000, tz=dt.UTC)


def to_ms(value: dt.datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return int(value.timestamp() * 1000)


def now_ms() -> int:
    return to_ms(dt.datetime.now(dt.UTC))


def format_lease_id(delivery_id: str, attempt: int) -> str:
    return f"{delivery_id}.{attempt}"


def parse_lease_id(lease_id: str) -> tuple[str, int]:
    """Split "<delivery_id>.<attempt>"; ValueError if it is not one."""
    delivery_id, sep, attempt = lease_id.rpartition(".")
    if not sep or not ids.is_uuid(delivery_id) or not attempt.isdigit():
        raise ValueError(f"malformed lease id {lease_id[:80]!r}")
    return delivery_id, int(attempt)


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    id: str
    name: str
    created_at: dt.datetime


class InputAuthKind(enum.StrEnum):
    BASIC = "basic"  # Authorization: Basic, username + password (bcrypt-hashed at rest)
    TOKEN = "token"  # Authorization: Bearer <token> or ?token=<token> (bcrypt-hashed at rest)


@dataclass(frozen=True, slots=True, kw_only=True)
class InputAuth:
    """What a sender must present to any input of a bucket; failures are 401, nothing stored."""

    kind: InputAuthKind
    username: str = ""  # basic only
    secret_hash: str = dataclasses.field(default="", repr=False)  # bcrypt of password/token


def describe_auth(input_auth: InputAuth | None) -> str:
    """What a bucket's inputs ask senders for, for people and audit entries: never a secret."""
    if input_auth is None:
        return "none"
    if input_auth.kind is InputAuthKind.BASIC:
        return f"basic (user {input_auth.username})"
    return "token"


class VerifyKind(enum.StrEnum):
    GITHUB = "github"  # X-Hub-Signature-256: sha256=<hex HMAC of the body>
    STRIPE = "stripe"  # Stripe-Signature: t=<ts>,v1=<hex HMAC of "ts.body">
    SHOPIFY = "shopify"  # X-Shopify-Hmac-Sha256: <base64 HMAC of the body>
    SLACK = "slack"  # X-Slack-Signature: v0=<hex HMAC of "v0:ts:body">
    STANDARD = "standard-webhooks"  # webhook-id/-timestamp/-signature, whsec_ secrets
    HMAC = "hmac"  # generic HMAC-SHA256 of the body in a chosen header and encoding


@dataclass(frozen=True, slots=True, kw_only=True)
class Verification:
    """How an input checks its provider's signature over the raw body.

    Several secrets may be valid at once (rotation). They are sealed at rest and only
    opened into this object in memory.
    """

    kind: VerifyKind
    secrets: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    header: str = ""  # hmac: the header carrying the signature
    encoding: str = "hex"  # hmac: hex or base64
    prefix: str = ""  # hmac: text before the signature, e.g. "sha256="
    tolerance_s: int = 300  # timestamped schemes: how far from now a timestamp may be


class ResponseKind(enum.StrEnum):
    ACCEPT = "accept"  # 200, empty, no software name
    STATIC = "static"  # a configured status, headers and body
    WAIT = "wait"  # the destination's own answer, relayed back by the agent


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseMode:
    kind: ResponseKind = ResponseKind.ACCEPT
    status: int = 200  # static, and wait's fallback when fallback is set
    headers: Headers = ()
    body: bytes = b""
    timeout_ms: int = 30_000  # wait: how long to hold the caller
    fallback: bool = False  # wait: on timeout answer status/headers/body instead of 504


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """A token bucket: `per_s` requests a second on average, bursts up to `burst`."""

    per_s: float
    burst: int

    def describe(self) -> str:
        """'10/s, burst 20'."""
        return f"{self.per_s:g}/s, burst {self.burst}"

    def __post_init__(self) -> None:
        if not (0 < self.per_s < float("inf")) or self.burst < 1:
            raise ValueError("a rate limit needs a rate above 0 and a burst of at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketPolicy:
    """How a bucket retries, keeps and deduplicates its events."""

    max_attempts: int = 60
    max_age_ms: int = 48 * HOUR_MS  # dead-letter this long after the first attempt
    retention_ms: int = 7 * DAY_MS  # events older than this are deleted once settled
    dlq_retention_ms: int = 7 * DAY_MS  # dead deliveries are kept this long after dying
    dedup_headers: tuple[str, ...] = DEFAULT_DEDUP_HEADERS  # () turns deduplication off
    dedup_window_ms: int = DAY_MS
    # Bodies, headers and queries stay in memory and go straight to connected agents;
    # the database records only that an event came and how its delivery went.
    ephemeral: bool = False

    def __post_init__(self) -> None:
        if len(self.dedup_headers) > MAX_DEDUP_HEADERS:
            raise ValueError(f"at most {MAX_DEDUP_HEADERS} dedup headers")
        for name, value in (
            ("max_attempts", self.max_attempts),
            ("max_age_ms", self.max_age_ms),
            ("retention_ms", self.retention_ms),
            ("dlq_retention_ms", self.dlq_retention_ms),
            ("dedup_window_ms", self.dedup_window_ms),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    id: str
    account_id: str
    name: str
    policy: BucketPolicy
    created_at: dt.datetime
    input_auth: InputAuth | None = None  # None: anyone with an input's URL may post


@dataclass(frozen=True, slots=True, kw_only=True)
class Input:
    id: str
    bucket_id: str
    name: str
    max_body_bytes: int | None
    created_at: dt.datetime
    verification: Verification | None = None
    response: ResponseMode = ResponseMode()
    rate_limit: RateLimit | None = None  # None: only the server-wide limits apply


@dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    id: str
    bucket_id: str
    name: str
    kind: OutputKind
    ordered: bool  # one delivery in flight at a time, oldest first
    created_at: dt.datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """What ingress needs to know about an input: its bucket and where events go."""

    input: Input
    bucket: Bucket
    output_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    key_id: str
    account_id: str
    name: str
    bucket_ids: tuple[str, ...]
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    # mTLS: SHA-256 (hex) of the client certificate the token is bound to; None: any.
    client_cert_sha256: str | None = None
    # Rotation: the secret before the last rotation still works until then; None: no grace.
    previous_valid_until: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Nonce:
    """SHA-256 of what a timestamped signature signed: seen again before expiry, a replay."""

    value: str  # 64 hex digits
    expires_at_ms: int  # after this the signature's timestamp is refused as stale anyway


@dataclass(frozen=True, slots=True, kw_only=True)
class IncomingEvent:
    """A webhook as received, before it is sealed and stored."""

    id: str
    route: Route
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    received_at: dt.datetime
    source: str
    nonce: Nonce | None = None  # from a verified timestamped signature (ingress.signatures)
    # Wait mode: until when (ms) its caller is held for the destination's answer.
    caller_waits_until: int | None = None

    def log_context(self) -> dict[str, object]:
        return {"event_id": self.id, "input_id": self.route.input.id, "size": len(self.body)}


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryInfo:
    id: str
    event_id: str
    output: str
    state: DeliveryState
    attempts: int
    available_at: dt.datetime
    lease_expires_at: dt.datetime | None
    last_error: str | None
    replay: bool
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class EventSummary:
    id: str
    bucket: str
    input_id: str
    method: str
    path: str
    size: int
    received_at: dt.datetime
    source: str
    deliveries: tuple[DeliveryInfo, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptInfo:
    delivery_id: str
    attempt: int
    outcome: Outcome
    agent: str
    started_at: dt.datetime | None
    ended_at: dt.datetime
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class EventDetail:
    summary: EventSummary
    query: str
    headers: Headers
    body: bytes
    attempts: tuple[AttemptInfo, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """One delivery handed to an agent, with the event it carries (decrypted)."""

    lease_id: str
    delivery_id: str
    attempt: int
    deadline: dt.datetime
    event_id: str
    bucket: str
    output: str
    input_id: str
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    received_at: dt.datetime
    replay: bool
    # Wait mode: until when (ms) the event's caller is held, on whichever replica took it.
    caller_waits_until: int | None = None

    def log_context(self) -> dict[str, object]:
        return {"event_id": self.event_id, "lease_id": self.lease_id, "attempt": self.attempt}


@dataclass(frozen=True, slots=True, kw_only=True)
class Slot:
    """A free place in a connected agent's window, held for one new event while ingest
    commits it: the delivery is written LEASED to `holder` in the event's own transaction
    and `give`n to the agent's stream right after the commit, with no claim and no
    re-read. `cancel` returns the place (the event was a duplicate, the output is
    ordered, the write failed); exactly one of the two is called."""

    holder: str
    lease_ms: int
    bucket: str  # names, as the agent sees them
    output: str
    give: Callable[[Lease], None]
    cancel: Callable[[], None]


Offer = Callable[[str], "Slot | None"]  # output id -> a held place, or None


@dataclass(frozen=True, slots=True, kw_only=True)
class Settlement:
    """An agent's verdict on one lease."""

    lease_id: str
    outcome: Outcome
    retry_after_ms: int | None = None
    reason: str = ""
