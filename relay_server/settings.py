"""Frozen settings per concern, validated with actionable messages. Read only by the CLI."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

from relay_server import errors, models, retry, throttle
from relay_server.ingress import source
from relay_server.store import database

MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 10 * MIB
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
DEFAULT_GRPC_LISTEN = "127.0.0.1:50051"
DEFAULT_LEASE_MS = 30_000
# gRPC keepalive (see GrpcSettings): a dead agent path is noticed within time + timeout.
DEFAULT_KEEPALIVE_TIME_MS = 20_000
DEFAULT_KEEPALIVE_TIMEOUT_MS = 10_000
DEFAULT_MIN_AGENT_PING_MS = 10_000
# Per source (see ingress/limits.py): far above what one provider sends, even in bursts,
# yet one address cannot take the whole write capacity (about 3,000 webhooks/s).
DEFAULT_SOURCE_RATE = models.RateLimit(per_s=1000.0, burst=2000)
DEFAULT_STREAMS_PER_TOKEN = 16


def parse_listen(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadLimits:
    """What one HTTP request may send, and how slowly (see ingress/connections.py)."""

    max_request_line: int = 8190  # bytes: method, path and query (431 above)
    max_header_bytes: int = 8190  # bytes in one header line (431 above)
    max_headers: int = 128  # header lines (431 above)
    header_timeout_s: float = 10.0  # a request's headers must all arrive within this
    body_timeout_s: float = 30.0  # and its body within this once the headers are in
    idle_timeout_s: float = 75.0  # a kept-alive connection without a request is closed

    def __post_init__(self) -> None:
        if min(self.max_request_line, self.max_header_bytes, self.max_headers) < 1:
            raise errors.ConfigError("header size limits must be at least 1")
        if min(self.header_timeout_s, self.body_timeout_s, self.idle_timeout_s) <= 0:
            raise errors.ConfigError(
                "--header-timeout, --body-timeout and --idle-timeout must be longer than 0"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class IngressSettings:
    listen: str = DEFAULT_HTTP_LISTEN
    public_url: str = ""  # how providers reach /in/...; derived from `listen` when empty
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    route_cache_s: float = 2.0  # how long an input lookup is reused
    shutdown_grace_s: float = 10.0  # in-flight requests get this long to commit on stop
    # Reverse proxies whose X-Forwarded-For is believed (CIDRs); empty: none.
    trusted_proxies: tuple[str, ...] = ()
    tls_cert: pathlib.Path | None = None  # HTTPS: PEM certificate chain
    tls_key: pathlib.Path | None = None  # HTTPS: PEM private key (not readable by others)
    unknown_input_status: int = 200  # 200: like a real input (no enumeration); or 404
    max_waiting: int = 1000  # callers held at once by inputs in response mode "wait"
    ephemeral_max_bytes: int = 64 * MIB  # memory for ephemeral buckets' payloads
    source_rate: models.RateLimit | None = DEFAULT_SOURCE_RATE  # None: no per-source limit
    read_limits: ReadLimits = field(default_factory=ReadLimits)

    def __post_init__(self) -> None:
        parse_listen(self.listen, "HTTP listen address")
        if self.unknown_input_status not in (200, 404):
            raise errors.ConfigError("--unknown-input must be 200 or 404")
        if self.max_waiting < 0 or self.ephemeral_max_bytes < 0:
            raise errors.ConfigError("--max-waiting and --ephemeral-max-bytes cannot be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise errors.ConfigError("HTTPS needs both --http-tls-cert and --http-tls-key")
        source.parse_networks(self.trusted_proxies)
        if not 1 <= self.max_body_bytes <= 1024 * MIB:
            raise errors.ConfigError("max body size must be between 1 byte and 1 GiB")

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = parse_listen(self.listen, "HTTP listen address")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"{'http' if self.tls_cert is None else 'https'}://{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcSettings:
    listen: str = DEFAULT_GRPC_LISTEN
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    tls_client_ca: pathlib.Path | None = None  # require client certificates signed by it
    # Keepalive: ping an idle agent every keepalive_time_ms and drop it when no answer
    # arrives within keepalive_timeout_ms (its leases go back to the queue). Agents may
    # ping as often as every min_agent_ping_ms; one that pings more often is disconnected.
    keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS
    keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS
    min_agent_ping_ms: int = DEFAULT_MIN_AGENT_PING_MS
    max_connections: int = 1000
    max_in_flight: int = 1000  # credit cap per stream, whatever the agent asks
    default_in_flight: int = 16
    max_frame_bytes: int = 16 * MIB  # largest agent frame accepted
    max_streams_per_token: int = DEFAULT_STREAMS_PER_TOKEN  # open streams per agent token

    def __post_init__(self) -> None:
        parse_listen(self.listen, "gRPC listen address")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise errors.ConfigError("TLS needs both --grpc-tls-cert and --grpc-tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise errors.ConfigError("--grpc-tls-client-ca needs --grpc-tls-cert/--grpc-tls-key")
        keepalive = (self.keepalive_time_ms, self.keepalive_timeout_ms, self.min_agent_ping_ms)
        if not all(1 <= ms < 2**31 for ms in keepalive):
            raise errors.ConfigError(
                "--grpc-keepalive-time, --grpc-keepalive-timeout and --grpc-min-agent-ping "
                "must each be longer than 0 and shorter than 24 days"
            )
        if min(self.max_in_flight, self.max_frame_bytes, self.max_streams_per_token) < 1:
            raise errors.ConfigError(
                "--grpc-max-in-flight, --grpc-max-frame-bytes and --grpc-max-streams-per-token "
                "must each be at least 1"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchSettings:
    lease_ms: int = DEFAULT_LEASE_MS
    max_extend_ms: int = 10 * 60_000  # the longest single Extend honoured
    poll_interval_s: float = 1.0  # sessions look for due retries at least this often
    reap_interval_s: float = 1.0
    clean_interval_s: float = 60.0  # how often the retention cleaner runs
    max_batch_bytes: int = MIB  # deliveries packed into one frame up to this many body bytes
    listen: bool = True  # PostgreSQL: LISTEN for other replicas' new events (pg_notify.py)
    retry: retry.RetryPolicy = field(default_factory=retry.RetryPolicy)

    def __post_init__(self) -> None:
        if self.lease_ms < 1000:
            raise errors.ConfigError("lease length must be at least 1000 ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthThrottleSettings:
    """Failed-auth throttling per source (webhook credentials, signatures, agent tokens)."""

    max_failures: int = throttle.DEFAULT_MAX_FAILURES  # within window_s; 0 turns it off
    window_s: float = throttle.DEFAULT_WINDOW_S

    def __post_init__(self) -> None:
        if self.max_failures < 0 or self.window_s <= 0:
            raise errors.ConfigError(
                "--auth-failure-limit must be 0 (off) or more and --auth-failure-window "
                "longer than 0"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    database: database.DatabaseSettings
    key_file: pathlib.Path
    ingress: IngressSettings = field(default_factory=IngressSettings)
    grpc: GrpcSettings = field(default_factory=GrpcSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    auth_throttle: AuthThrottleSettings = field(default_factory=AuthThrottleSettings)
    migrate_on_start: bool = True
