"""The agent's settings: frozen, validated on creation, passed down explicitly.

Nothing here reads the environment or files; cli.py does that and builds these objects.
Durations carry their unit in their name.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import pathlib
import shlex
import socket
import urllib.parse
from typing import TypeAlias

from relay_agent import errors

DEFAULT_MAX_IN_FLIGHT = 16
DEFAULT_OUTPUT = "default"  # every bucket has one; `relay-server output create` adds more
MAX_IN_FLIGHT_LIMIT = 10_000
# gRPC keepalive: ping the server after this long without activity on the connection...
# The server must accept pings this often (relay-server serve --grpc-min-agent-ping).
DEFAULT_KEEPALIVE_TIME_MS = 20_000
# ...and count the connection as dead, and reconnect, if the ping is not answered within
# this. A path that silently drops packets (a NAT entry gone, a pulled cable) is noticed
# within about keepalive time + keepalive timeout; TCP alone would take many minutes.
DEFAULT_KEEPALIVE_TIMEOUT_MS = 10_000
# On stop, in-flight deliveries get this long to finish before they are NACKed.
DEFAULT_SHUTDOWN_GRACE_S = 30.0
DEFAULT_HTTP_TIMEOUT_S = 30.0
# An exec script gets this long per event (its lease is extended meanwhile)...
DEFAULT_EXEC_TIMEOUT_S = 30.0
# ...then its process group gets SIGTERM, and SIGKILL if still there after this long.
DEFAULT_EXEC_KILL_GRACE_S = 2.0
# How much of a script's stdout and of its stderr is kept (the end) for the log.
DEFAULT_EXEC_OUTPUT_LIMIT_BYTES = 4096
SHELL = "/bin/sh"


class Jitter(enum.StrEnum):
    FULL = "full"  # sleep a uniformly random time between 0 and the computed delay
    NONE = "none"  # sleep exactly the computed delay (tests, debugging)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReconnectPolicy:
    """Capped exponential backoff between reconnection attempts."""

    initial_s: float = 0.5
    multiplier: float = 2.0
    max_s: float = 30.0
    jitter: Jitter = Jitter.FULL

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise errors.ConfigError(f"reconnect initial_s must be > 0, not {self.initial_s}")
        if not self.multiplier >= 1:
            raise errors.ConfigError(f"reconnect multiplier must be >= 1, not {self.multiplier}")
        if not self.max_s >= self.initial_s:
            raise errors.ConfigError(
                f"reconnect max_s ({self.max_s}) must be >= initial_s ({self.initial_s})"
            )


def whole_ms(seconds: float) -> int:
    """Seconds, as given in a flag or the config file, in whole milliseconds (at least 1)."""
    return max(1, round(seconds * 1000))


def reconnect_delay(policy: ReconnectPolicy, failures: int, rand: float) -> float:
    """Seconds to wait before the next attempt, after `failures` consecutive failures.

    `rand` is a uniform draw from [0, 1] supplied by the caller, so this stays pure.
    No failure yet means no wait.
    """
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be within [0, 1], not {rand}")
    if failures <= 0:
        return 0.0
    try:
        ceiling = min(policy.max_s, policy.initial_s * policy.multiplier ** (failures - 1))
    except OverflowError:
        ceiling = policy.max_s
    if policy.jitter is Jitter.FULL:
        return ceiling * rand
    return ceiling


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """How to reach the server and what to ask it for."""

    # "host:port" of the server's gRPC listener; several replicas: "a:port,b:port" (the
    # agent dials the next one each time it reconnects, see `servers`)
    server: str
    token: str = dataclasses.field(repr=False)  # "<key_id>.<secret>"; never logged
    buckets: tuple[str, ...]
    output: str = DEFAULT_OUTPUT  # which of each bucket's outputs to consume
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    agent_name: str = dataclasses.field(default_factory=socket.gethostname)
    ca_file: pathlib.Path | None = None  # PEM roots to trust instead of the system's
    insecure: bool = False  # plaintext gRPC: only for tests and loopback
    tls_server_name: str | None = None  # name to check in the server's certificate
    # mTLS: the certificate chain and private key (PEM) this agent presents to the server
    client_cert: pathlib.Path | None = None
    client_key: pathlib.Path | None = None
    keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS
    keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    reconnect: ReconnectPolicy = dataclasses.field(default_factory=ReconnectPolicy)

    def __post_init__(self) -> None:
        server_list(self.server)
        check_token(self.token)
        _check_buckets(self.buckets)
        if not self.output or self.output != self.output.strip() or len(self.output) > 100:
            raise errors.ConfigError(f"invalid output name {self.output!r}")
        _check_range("max_in_flight", self.max_in_flight, 1, MAX_IN_FLIGHT_LIMIT)
        _check_range("keepalive_time_ms", self.keepalive_time_ms, 1, 2**31 - 1)
        _check_range("keepalive_timeout_ms", self.keepalive_timeout_ms, 1, 2**31 - 1)
        if not (math.isfinite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise errors.ConfigError(f"shutdown_grace_s must be >= 0, not {self.shutdown_grace_s}")
        if not self.agent_name.strip():
            raise errors.ConfigError("the agent name must not be empty")
        self._check_tls()

    @property
    def servers(self) -> tuple[str, ...]:
        """The addresses to dial, in turn: one per reconnect, round the list."""
        return server_list(self.server)

    @property
    def key_id(self) -> str:
        """The public half of the token, safe to show."""
        return self.token.partition(".")[0]

    def _check_tls(self) -> None:
        if self.insecure and self.ca_file is not None:
            raise errors.ConfigError(
                "--ca-file and --insecure contradict each other: a CA file is for TLS, "
                "--insecure turns TLS off"
            )
        if self.insecure and self.tls_server_name is not None:
            raise errors.ConfigError(
                "--tls-server-name and --insecure contradict each other: "
                "there is no certificate to check without TLS"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise errors.ConfigError(
                "a client certificate needs both --client-cert and --client-key"
            )
        if self.insecure and self.client_cert is not None:
            raise errors.ConfigError(
                "--client-cert and --insecure contradict each other: "
                "a client certificate is presented in the TLS handshake"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HttpDestinationSettings:
    """Where the http destination forwards events."""

    url: str  # base URL; the event's path tail is appended and its query string added
    timeout_s: float = DEFAULT_HTTP_TIMEOUT_S  # whole request, connect to last byte

    def __post_init__(self) -> None:
        check_forward_url(self.url)
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise errors.ConfigError(f"the HTTP timeout must be > 0 seconds, not {self.timeout_s}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ExecDestinationSettings:
    """What the exec destination runs for each event, and for how long."""

    argv: tuple[str, ...]  # program and arguments; see exec_argv() for the --exec string
    timeout_s: float = DEFAULT_EXEC_TIMEOUT_S  # from start to exit, before the kill
    kill_grace_s: float = DEFAULT_EXEC_KILL_GRACE_S  # SIGTERM -> SIGKILL
    output_limit_bytes: int = DEFAULT_EXEC_OUTPUT_LIMIT_BYTES

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise errors.ConfigError("the exec command is empty")
        if any("\0" in arg for arg in self.argv):
            raise errors.ConfigError("the exec command must not contain NUL characters")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise errors.ConfigError(f"the exec timeout must be > 0 seconds, not {self.timeout_s}")
        if not (math.isfinite(self.kill_grace_s) and self.kill_grace_s >= 0):
            raise errors.ConfigError(f"kill_grace_s must be >= 0, not {self.kill_grace_s}")
        _check_range("output_limit_bytes", self.output_limit_bytes, 1, 2**20)


def exec_argv(command: str, *, shell: bool) -> tuple[str, ...]:
    """The argv for an --exec command: split like a shell would, or given to /bin/sh -c."""
    if not command.strip():
        raise errors.ConfigError("the exec command is empty")
    if shell:
        return (SHELL, "-c", command)
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise errors.ConfigError(
            f"cannot split the exec command {command!r}: {exc} "
            "(fix the quoting, or run it through /bin/sh with --shell)"
        ) from None
    if not argv:
        raise errors.ConfigError("the exec command is empty")
    return argv


class DirFormat(enum.StrEnum):
    JSON = "json"  # one <name>.json envelope per event: metadata, headers and body
    RAW = "raw"  # <name>.body (the bytes as received) plus <name>.meta.json, written last


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DirDestinationSettings:
    """Where the dir destination writes one file per event, and how."""

    path: pathlib.Path  # the spool directory; created at start-up if missing
    format: DirFormat = DirFormat.JSON

    def __post_init__(self) -> None:
        if not str(self.path).strip():
            raise errors.ConfigError("the dir destination needs a directory path")
        if "\0" in str(self.path):
            raise errors.ConfigError("the directory path must not contain NUL characters")


DestinationSettings: TypeAlias = (
    HttpDestinationSettings | ExecDestinationSettings | DirDestinationSettings
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """One stream of the agent: its buckets, its connection and where its events go."""

    agent: AgentSettings
    destination: DestinationSettings
    label: str = ""  # where it was defined ("subscription[1]"), for messages; "" from flags


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """Everything one agent process runs: each subscription is its own Agent."""

    subscriptions: tuple[Subscription, ...]
    # HOST:PORT for the local /healthz and /metrics (relay_agent.metrics); None: off.
    metrics_listen: str | None = None

    def __post_init__(self) -> None:
        if self.metrics_listen is not None:
            check_server_address(self.metrics_listen)
        if not self.subscriptions:
            raise errors.ConfigError("configure at least one subscription")
        owner: dict[tuple[str, str], str] = {}
        for index, subscription in enumerate(self.subscriptions):
            label = subscription.label or f"subscription[{index}]"
            output = subscription.agent.output
            for bucket in subscription.agent.buckets:
                if (bucket, output) in owner:
                    raise errors.ConfigError(
                        f"bucket {bucket!r} (output {output!r}) is in both "
                        f"{owner[bucket, output]} and {label}: give each bucket to one subscription"
                    )
                owner[bucket, output] = label


def check_server_address(server: str) -> None:
    """Accept "host:port" or "[ipv6]:port"."""
    host, sep, port = server.rpartition(":")
    expected = "expected HOST:PORT, e.g. relay.example.com:7443"
    if not sep or not host or host in ("[]",):
        raise errors.ConfigError(f"invalid server address {server!r}: {expected}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.ConfigError(f"invalid port in server address {server!r}: {expected}")
    if "/" in host or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise errors.ConfigError(f"invalid server address {server!r}: {expected}")


def server_list(servers: str) -> tuple[str, ...]:
    """The addresses of "host:port" or "host:port,host:port,...", each checked."""
    found = tuple(part.strip() for part in servers.split(","))
    for server in found:
        check_server_address(server)
    return found


def check_token(token: str) -> None:
    """A token is "<key_id>.<secret>"; the key id holds no dot. Never echoes the token."""
    key_id, sep, secret = token.partition(".")
    if not sep or not key_id or not secret:
        raise errors.ConfigError(
            "malformed agent token: expected <key_id>.<secret> "
            "(the key id, a dot, then the secret, as shown when the token was created)"
        )
    if not all(33 <= ord(char) <= 126 for char in token):
        raise errors.ConfigError(
            "malformed agent token: it may only hold printable ASCII characters, "
            "without spaces (expected <key_id>.<secret>)"
        )


def check_forward_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(
            f"invalid forward URL {url!r}: expected http://HOST[:PORT][/PATH] or https://..."
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise errors.ConfigError(
            f"invalid forward URL {url!r}: it must not have a query string or fragment "
            "(each event's own query string is appended)"
        )
    try:
        parts.port  # noqa: B018 - urllib validates the port lazily
    except ValueError as exc:
        raise errors.ConfigError(f"invalid forward URL {url!r}: {exc}") from None


def _check_buckets(buckets: tuple[str, ...]) -> None:
    if not buckets:
        raise errors.ConfigError("subscribe to at least one bucket (--bucket NAME)")
    seen: set[str] = set()
    for bucket in buckets:
        if not bucket or bucket != bucket.strip():
            raise errors.ConfigError(f"invalid bucket name {bucket!r}")
        if bucket in seen:
            raise errors.ConfigError(f"bucket {bucket!r} is given twice")
        seen.add(bucket)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise errors.ConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}")
