"""`relay-server`: serve, set up, and administer a Stowhook relay.

Settings come from (highest first) flags, STOWHOOK_* environment variables, a TOML file
(--config / STOWHOOK_CONFIG), then defaults. The file's top-level keys are the global
options (database_url, key_file, public_url, log_format, log_level); its [serve] table
holds the serve options (http_listen, grpc_listen, max_body_bytes, ...). This module is
the only one that reads the environment or files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from relay_server import __version__, console, crypto, errors, models, settings
from relay_server import logging as relay_logging
from relay_server.store import database, sql

T = TypeVar("T")

DEFAULT_DATABASE_URL = "sqlite:///var/stowhook.db"
DEFAULT_KEY_FILE = "var/stowhook.key"


@dataclass(frozen=True, slots=True, kw_only=True)
class CliState:
    database_url: str
    database_tuning: dict[str, Any]  # pool size and timeouts (DatabaseSettings fields)
    key_file: pathlib.Path
    public_url: str
    serve_defaults: dict[str, Any]

    def database(self, **extra: Any) -> database.DatabaseSettings:
        return database.DatabaseSettings(url=self.database_url, **self.database_tuning, **extra)

    def keyring(self, *, required: bool) -> crypto.KeyRing | None:
        if not required and not self.key_file.exists():
            return None
        return crypto.load_key_file(self.key_file)

    def public_base(self) -> str:
        listen = self._serve_setting("http_listen") or settings.DEFAULT_HTTP_LISTEN
        cert, key = self._serve_setting("http_tls_cert"), self._serve_setting("http_tls_key")
        with reported_errors():
            return settings.IngressSettings(
                listen=listen,
                public_url=self.public_url,
                tls_cert=pathlib.Path(cert) if cert else None,
                tls_key=pathlib.Path(key) if key else None,
            ).base_url

    def _serve_setting(self, name: str) -> str | None:
        """A serve option as `serve` would see it without flags: environment, then file."""
        value = os.environ.get(f"STOWHOOK_{name.upper()}") or self.serve_defaults.get(name)
        return None if value is None else str(value)


class RelayCliError(click.ClickException):
    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Domain errors become one `error: ...` line and a non-zero exit, not a traceback."""
    try:
        yield
    except errors.RelayError as exc:
        raise RelayCliError(exc.message) from exc


def run_with_store(
    state: CliState, action: Callable[[sql.SqlStore], Awaitable[T]], *, need_key: bool = False
) -> T:
    async def main() -> T:
        store = sql.SqlStore(state.database(), state.keyring(required=need_key))
        await store.migrate()
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    with reported_errors():
        return asyncio.run(main())


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return value
    path = pathlib.Path(value)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise click.BadParameter(f"{path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}") from exc
    known = {p.name for p in ctx.command.params if p.name} | {"serve"}
    unknown = sorted(set(data) - known)
    serve_command = ctx.command.commands["serve"] if isinstance(ctx.command, click.Group) else None
    if serve_command is not None and isinstance(data.get("serve"), dict):
        serve_known = {p.name for p in serve_command.params if p.name}
        unknown += sorted(f"serve.{k}" for k in set(data["serve"]) - serve_known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="relay-server")
@click.option(
    "--config",
    envvar="STOWHOOK_CONFIG",
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="TOML settings file.",
)
@click.option(
    "--database-url",
    envvar="STOWHOOK_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help="sqlite:///path.db or postgresql+asyncpg://user@host/db",
)
@click.option(
    "--database-pool-size",
    envvar="STOWHOOK_DATABASE_POOL_SIZE",
    type=click.IntRange(1),
    default=database.DEFAULT_POOL_SIZE,
    show_default=True,
    help="PostgreSQL: connections each process keeps open (up to 10 more in bursts).",
)
@click.option(
    "--database-connect-timeout",
    envvar="STOWHOOK_DATABASE_CONNECT_TIMEOUT",
    default=console.format_duration_ms(database.DEFAULT_CONNECT_TIMEOUT_MS),
    show_default=True,
    help="PostgreSQL: give up opening a connection, or waiting for a free one, after this; "
    "a webhook then gets 503 + Retry-After.",
)
@click.option(
    "--database-statement-timeout",
    envvar="STOWHOOK_DATABASE_STATEMENT_TIMEOUT",
    default=console.format_duration_ms(database.DEFAULT_STATEMENT_TIMEOUT_MS),
    show_default=True,
    help="PostgreSQL: the server cancels a statement running longer (0 never); migrations "
    "are exempt.",
)
@click.option(
    "--key-file",
    envvar="STOWHOOK_KEY_FILE",
    default=DEFAULT_KEY_FILE,
    show_default=True,
    type=click.Path(path_type=pathlib.Path),
    help="AES-256 key file (mode 0600).",
)
@click.option(
    "--public-url",
    envvar="STOWHOOK_PUBLIC_URL",
    default="",
    help="Base URL providers use to reach this server (default: from --http-listen).",
)
@click.option(
    "--log-format",
    envvar="STOWHOOK_LOG_FORMAT",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
)
@click.option("--log-level", envvar="STOWHOOK_LOG_LEVEL", default="info", show_default=True)
@click.pass_context
def main(
    ctx: click.Context,
    database_url: str,
    database_pool_size: int,
    database_connect_timeout: str,
    database_statement_timeout: str,
    key_file: pathlib.Path,
    public_url: str,
    log_format: relay_logging.LogFormat,
    log_level: str,
) -> None:
    """Stowhook relay server: store-and-forward webhooks for agents behind firewalls."""
    # Everything the server writes (database, WAL, keys, tokens) is private to its user.
    os.umask(0o077)
    relay_logging.configure(log_format, log_level)
    ctx.obj = CliState(
        database_url=database_url,
        database_tuning={
            "pool_size": database_pool_size,
            "connect_timeout_s": console.parse_duration_ms(database_connect_timeout) / 1000,
            "statement_timeout_ms": console.parse_duration_ms(database_statement_timeout),
        },
        key_file=key_file,
        public_url=public_url,
        serve_defaults=dict((ctx.default_map or {}).get("serve", {})),
    )


@main.command()
@click.option(
    "--http-listen",
    envvar="STOWHOOK_HTTP_LISTEN",
    default=settings.DEFAULT_HTTP_LISTEN,
    show_default=True,
    help="Ingress HOST:PORT.",
)
@click.option(
    "--grpc-listen",
    envvar="STOWHOOK_GRPC_LISTEN",
    default=settings.DEFAULT_GRPC_LISTEN,
    show_default=True,
    help="Agent stream HOST:PORT.",
)
@click.option(
    "--max-body-bytes",
    envvar="STOWHOOK_MAX_BODY_BYTES",
    type=int,
    default=settings.DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    help="Largest webhook body accepted (413 above).",
)
@click.option(
    "--unknown-input",
    envvar="STOWHOOK_UNKNOWN_INPUT",
    type=click.Choice(["200", "404"]),
    default="200",
    show_default=True,
    help="Answer to webhooks for inputs that do not exist: 200 (the same empty answer as a "
    "real input, so input ids cannot be probed) or 404.",
)
@click.option(
    "--max-waiting",
    envvar="STOWHOOK_MAX_WAITING",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    help="Callers held at once by inputs in response mode 'wait'; beyond it a caller gets "
    "the timeout answer at once (the event is still stored and delivered).",
)
@click.option(
    "--ephemeral-max-bytes",
    envvar="STOWHOOK_EPHEMERAL_MAX_BYTES",
    type=click.IntRange(0),
    default=64 * settings.MIB,
    show_default=True,
    help="Memory for the payloads of ephemeral buckets' undelivered events; when full, "
    "their webhooks get 503 + Retry-After.",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="CIDR",
    help="A reverse proxy (address or CIDR) whose X-Forwarded-For names the client; repeat "
    "for several. Without one the header is ignored.",
)
@click.option(
    "--lease-ms",
    envvar="STOWHOOK_LEASE_MS",
    type=int,
    default=settings.DEFAULT_LEASE_MS,
    show_default=True,
    help="How long an agent holds a delivery without extending it.",
)
@click.option(
    "--http-tls-cert",
    envvar="STOWHOOK_HTTP_TLS_CERT",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="Serve webhooks over HTTPS with this PEM certificate chain (with --http-tls-key).",
)
@click.option(
    "--http-tls-key",
    envvar="STOWHOOK_HTTP_TLS_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="The HTTPS private key (PEM, unencrypted; refused if other users can read it).",
)
@click.option(
    "--grpc-tls-cert",
    envvar="STOWHOOK_GRPC_TLS_CERT",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
)
@click.option(
    "--grpc-tls-key",
    envvar="STOWHOOK_GRPC_TLS_KEY",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
)
@click.option(
    "--grpc-tls-client-ca",
    envvar="STOWHOOK_GRPC_TLS_CLIENT_CA",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="Require agent certificates signed by this CA (mTLS).",
)
@click.option(
    "--grpc-keepalive-time",
    envvar="STOWHOOK_GRPC_KEEPALIVE_TIME",
    default=console.format_duration_ms(settings.DEFAULT_KEEPALIVE_TIME_MS),
    show_default=True,
    help="Ping an agent after this long without activity on its connection.",
)
@click.option(
    "--grpc-keepalive-timeout",
    envvar="STOWHOOK_GRPC_KEEPALIVE_TIMEOUT",
    default=console.format_duration_ms(settings.DEFAULT_KEEPALIVE_TIMEOUT_MS),
    show_default=True,
    help="Drop an agent whose ping is not answered within this; its leases go back to "
    "the queue. A silently dead path is noticed after about time + timeout.",
)
@click.option(
    "--grpc-min-agent-ping",
    envvar="STOWHOOK_GRPC_MIN_AGENT_PING",
    default=console.format_duration_ms(settings.DEFAULT_MIN_AGENT_PING_MS),
    show_default=True,
    help="Shortest interval allowed between an agent's keepalive pings (agents pinging "
    "more often are disconnected): at most the agents' --keepalive-time.",
)
@click.option(
    "--sqlite-synchronous",
    envvar="STOWHOOK_SQLITE_SYNCHRONOUS",
    default="FULL",
    show_default=True,
    type=click.Choice(database.SQLITE_SYNCHRONOUS, case_sensitive=False),
    help="FULL survives power loss; NORMAL survives process crashes only.",
)
@click.option(
    "--sqlite-busy-timeout",
    envvar="STOWHOOK_SQLITE_BUSY_TIMEOUT",
    default="5s",
    show_default=True,
    help="How long a write waits for a SQLite lock held elsewhere before the webhook "
    "gets 503 + Retry-After.",
)
@click.option("--retry-initial", default="5s", show_default=True, help="First retry delay bound.")
@click.option("--retry-cap", default="1h", show_default=True, help="Longest retry delay bound.")
@click.option(
    "--poll-interval",
    default="1s",
    show_default=True,
    help="How often idle streams look for work nobody announced: retries that came due, "
    "replays, another replica's events when a notification was lost.",
)
@click.option(
    "--listen/--no-listen",
    "listen",
    envvar="STOWHOOK_LISTEN",
    default=True,
    show_default=True,
    help="PostgreSQL: hear other replicas' new events at once (LISTEN/NOTIFY). Without it "
    "an event received by another replica waits for --poll-interval. Ignored on SQLite.",
)
@click.option(
    "--retention-interval",
    default="1m",
    show_default=True,
    help="How often the cleaner deletes what the buckets' retention lets go.",
)
@click.option(
    "--auth-failure-limit",
    envvar="STOWHOOK_AUTH_FAILURE_LIMIT",
    type=click.IntRange(0),
    default=settings.AuthThrottleSettings().max_failures,
    show_default=True,
    help="Refused credentials or signatures (webhooks and agent tokens) one address may "
    "send within --auth-failure-window; after that it gets 429 / RESOURCE_EXHAUSTED "
    "without its credentials being looked at. 0 turns throttling off.",
)
@click.option(
    "--auth-failure-window",
    envvar="STOWHOOK_AUTH_FAILURE_WINDOW",
    default="1m",
    show_default=True,
    help="The window over which --auth-failure-limit counts.",
)
@click.option(
    "--source-rate",
    envvar="STOWHOOK_SOURCE_RATE",
    default=f"{settings.DEFAULT_SOURCE_RATE.per_s:g}/s",
    show_default=True,
    help="Webhooks one address (IPv6: one /64) may send, on average, e.g. 1000/s or 600/m; "
    "beyond it 429 + Retry-After. 0 turns the per-source limit off. Behind a reverse proxy "
    "set --trusted-proxy, or every sender counts as the proxy.",
)
@click.option(
    "--source-burst",
    envvar="STOWHOOK_SOURCE_BURST",
    type=click.IntRange(1),
    default=settings.DEFAULT_SOURCE_RATE.burst,
    show_default=True,
    help="Webhooks one address may send at once above --source-rate.",
)
@click.option(
    "--max-request-line",
    envvar="STOWHOOK_MAX_REQUEST_LINE",
    type=click.IntRange(1),
    default=settings.ReadLimits().max_request_line,
    show_default=True,
    help="Longest request line (method, path, query) in bytes; 431 above.",
)
@click.option(
    "--max-header-bytes",
    envvar="STOWHOOK_MAX_HEADER_BYTES",
    type=click.IntRange(1),
    default=settings.ReadLimits().max_header_bytes,
    show_default=True,
    help="Longest header line in bytes; 431 above.",
)
@click.option(
    "--max-headers",
    envvar="STOWHOOK_MAX_HEADERS",
    type=click.IntRange(1),
    default=settings.ReadLimits().max_headers,
    show_default=True,
    help="Most header lines in one request; 431 above.",
)
@click.option(
    "--header-timeout",
    envvar="STOWHOOK_HEADER_TIMEOUT",
    default=console.format_duration_ms(int(settings.ReadLimits().header_timeout_s * 1000)),
    show_default=True,
    help="A request's headers must all arrive within this (from the connection opening or "
    "the request's first byte), else 408 and the connection is closed (slow senders).",
)
@click.option(
    "--body-timeout",
    envvar="STOWHOOK_BODY_TIMEOUT",
    default=console.format_duration_ms(int(settings.ReadLimits().body_timeout_s * 1000)),
    show_default=True,
    help="A request's body must all arrive within this after its headers, else the "
    "connection is closed and nothing is stored.",
)
@click.option(
    "--idle-timeout",
    envvar="STOWHOOK_IDLE_TIMEOUT",
    default=console.format_duration_ms(int(settings.ReadLimits().idle_timeout_s * 1000)),
    show_default=True,
    help="Close a kept-alive connection on which no next request starts within this; keep "
    "it longer than a reverse proxy's own idle timeout.",
)
@click.option(
    "--grpc-max-streams-per-token",
    envvar="STOWHOOK_GRPC_MAX_STREAMS_PER_TOKEN",
    type=click.IntRange(1),
    default=settings.DEFAULT_STREAMS_PER_TOKEN,
    show_default=True,
    help="Agent streams one token may hold open at once; one more is refused with "
    "RESOURCE_EXHAUSTED naming the token and the limit.",
)
@click.option(
    "--grpc-max-in-flight",
    envvar="STOWHOOK_GRPC_MAX_IN_FLIGHT",
    type=click.IntRange(1),
    default=settings.GrpcSettings().max_in_flight,
    show_default=True,
    help="Deliveries one agent stream may hold at once, whatever the agent asks for.",
)
@click.option(
    "--grpc-max-frame-bytes",
    envvar="STOWHOOK_GRPC_MAX_FRAME_BYTES",
    type=click.IntRange(1),
    default=settings.GrpcSettings().max_frame_bytes,
    show_default=True,
    help="Largest frame an agent may send (a wait-mode reply carries the destination's "
    "body); a larger one ends its stream with RESOURCE_EXHAUSTED.",
)
@click.option(
    "--migrate/--no-migrate",
    default=True,
    show_default=True,
    help="Apply database migrations on start.",
)
@click.pass_obj
def serve(state: CliState, /, **options: Any) -> None:
    """Run the relay: webhook ingress (HTTP) and agent streams (gRPC)."""
    from relay_server import retry, server

    with reported_errors():
        config = settings.ServerSettings(
            database=state.database(
                sqlite_synchronous=options["sqlite_synchronous"].upper(),
                sqlite_busy_timeout_ms=console.parse_duration_ms(options["sqlite_busy_timeout"]),
            ),
            key_file=state.key_file,
            ingress=settings.IngressSettings(
                listen=options["http_listen"],
                public_url=state.public_url,
                max_body_bytes=options["max_body_bytes"],
                trusted_proxies=tuple(options["trusted_proxies"]),
                tls_cert=options["http_tls_cert"],
                tls_key=options["http_tls_key"],
                unknown_input_status=int(options["unknown_input"]),
                max_waiting=options["max_waiting"],
                ephemeral_max_bytes=options["ephemeral_max_bytes"],
                source_rate=_source_rate(options["source_rate"], options["source_burst"]),
                read_limits=settings.ReadLimits(
                    max_request_line=options["max_request_line"],
                    max_header_bytes=options["max_header_bytes"],
                    max_headers=options["max_headers"],
                    header_timeout_s=console.parse_duration_ms(options["header_timeout"]) / 1000,
                    body_timeout_s=console.parse_duration_ms(options["body_timeout"]) / 1000,
                    idle_timeout_s=console.parse_duration_ms(options["idle_timeout"]) / 1000,
                ),
            ),
            grpc=settings.GrpcSettings(
                listen=options["grpc_listen"],
                tls_cert=options["grpc_tls_cert"],
                tls_key=options["grpc_tls_key"],
                tls_client_ca=options["grpc_tls_client_ca"],
                keepalive_time_ms=console.parse_duration_ms(options["grpc_keepalive_time"]),
                keepalive_timeout_ms=console.parse_duration_ms(options["grpc_keepalive_timeout"]),
                min_agent_ping_ms=console.parse_duration_ms(options["grpc_min_agent_ping"]),
                max_streams_per_token=options["grpc_max_streams_per_token"],
                max_in_flight=options["grpc_max_in_flight"],
                max_frame_bytes=options["grpc_max_frame_bytes"],
            ),
            dispatch=settings.DispatchSettings(
                lease_ms=options["lease_ms"],
                poll_interval_s=console.parse_duration_ms(options["poll_interval"]) / 1000,
                clean_interval_s=console.parse_duration_ms(options["retention_interval"]) / 1000,
                listen=options["listen"],
                retry=retry.RetryPolicy(
                    initial_ms=console.parse_duration_ms(options["retry_initial"]),
                    cap_ms=console.parse_duration_ms(options["retry_cap"]),
                ),
            ),
            migrate_on_start=options["migrate"],
            auth_throttle=settings.AuthThrottleSettings(
                max_failures=options["auth_failure_limit"],
                window_s=console.parse_duration_ms(options["auth_failure_window"]) / 1000,
            ),
        )
        keyring = crypto.load_key_file(state.key_file)
        relay = server.RelayServer(config, keyring)
        _run_until_signalled(relay)


def _source_rate(rate: str, burst: int) -> models.RateLimit | None:
    per_s = console.parse_rate(rate)
    return models.RateLimit(per_s=per_s, burst=burst) if per_s > 0 else None


def _run_until_signalled(relay: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop)
        loop.add_signal_handler(signal.SIGHUP, relay.reload_keys)  # re-read the key file now
        await relay.run()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


@main.command()
@click.pass_obj
def migrate(state: CliState) -> None:
    """Apply database migrations (also done by serve on start)."""

    async def action(store: sql.SqlStore) -> None:
        return None

    run_with_store(state, action)
    click.echo("database schema is up to date")


from relay_server import (  # noqa: E402  (commands register on `main`)
    cli_admin,
    cli_audit,
    cli_buckets,
    cli_events,
    cli_limits,
    cli_migrate,
    cli_respond,
    cli_security,
    cli_setup,
    cli_tls,
)

cli_setup.register(main)
cli_admin.register(main)
cli_admin.input_.add_command(cli_respond.input_respond)
cli_admin.input_.add_command(cli_limits.input_limit)
cli_admin.token.add_command(cli_tls.token_bind)
cli_buckets.register(main)
cli_security.register(main)  # after the bucket and input groups
cli_events.register(main)
cli_audit.register(main)
cli_migrate.register(main)
