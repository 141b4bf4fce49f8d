"""The `relay-agent` command. The only place that reads the environment or files.

Exit codes: 0 after a clean stop; 2 bad configuration or usage; 3 the server refused the
token; 4 the server refused a bucket; 1 any other fatal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import click
import structlog

import relay_agent
from relay_agent import agent, errors, settings
from relay_agent import logging as agent_logging
from relay_agent.destinations import http

log = structlog.get_logger(__name__)

EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_TOKEN_REFUSED = 3
EXIT_BUCKET_REFUSED = 4

_LOG_LEVELS = ("debug", "info", "warning", "error")


@click.group()
@click.version_option(relay_agent.__version__, prog_name="relay-agent")
def main() -> None:
    """Stowhook relay agent: forwards stored webhooks from a Stowhook server."""


@main.command()
@click.option(
    "--server",
    envvar="STOWHOOK_SERVER",
    show_envvar=True,
    required=True,
    metavar="HOST:PORT",
    help="The server's gRPC address.",
)
@click.option(
    "--token",
    envvar="STOWHOOK_TOKEN",
    show_envvar=True,
    metavar="KEY_ID.SECRET",
    help="Agent token. Prefer --token-file or the environment: arguments are visible in ps.",
)
@click.option(
    "--token-file",
    envvar="STOWHOOK_TOKEN_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="File holding the agent token (surrounding whitespace is ignored).",
)
@click.option(
    "--bucket",
    "buckets",
    multiple=True,
    required=True,
    metavar="NAME",
    help="Bucket to receive events from (repeat for several).",
)
@click.option("--forward", required=True, metavar="URL", help="Forward each event to this URL.")
@click.option(
    "--max-in-flight",
    type=click.IntRange(1, settings.MAX_IN_FLIGHT_LIMIT),
    default=settings.DEFAULT_MAX_IN_FLIGHT,
    show_default=True,
    help="Deliveries handled at the same time.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=settings.DEFAULT_HTTP_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="Time the destination gets per event before the event is NACKed.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="PEM file with the CA certificates to trust for the server (default: system roots).",
)
@click.option("--insecure", is_flag=True, help="Plaintext gRPC without TLS (tests, loopback).")
@click.option("--tls-server-name", help="Name to expect in the server's certificate.")
@click.option("--name", "agent_name", help="Agent name shown by the server [default: hostname].")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    envvar="STOWHOOK_LOG_FORMAT",
    show_envvar=True,
    help="auto: JSON unless stderr is a terminal.",
)
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
)
def run(log_format: agent_logging.LogFormat, log_level: str, **options: Any) -> None:
    """Receive events and forward them until SIGTERM or SIGINT."""
    agent_logging.configure(log_format, log_level.lower())
    try:
        agent_settings, http_settings = _build_settings(**options)
        if agent_settings.insecure:
            log.warning("insecure_transport", detail="--insecure: gRPC without TLS")
        _run_loop(_serve(agent_settings, http_settings))
    except errors.AgentError as exc:
        _fail(exc)


def _build_settings(
    *,
    server: str,
    token: str | None,
    token_file: pathlib.Path | None,
    buckets: tuple[str, ...],
    forward: str,
    max_in_flight: int,
    timeout_s: float,
    ca_file: pathlib.Path | None,
    insecure: bool,
    tls_server_name: str | None,
    agent_name: str | None,
) -> tuple[settings.AgentSettings, settings.HttpDestinationSettings]:
    extra: dict[str, Any] = {"agent_name": agent_name} if agent_name else {}
    agent_settings = settings.AgentSettings(
        server=server,
        token=_token(token, token_file),
        buckets=buckets,
        max_in_flight=max_in_flight,
        ca_file=ca_file,
        insecure=insecure,
        tls_server_name=tls_server_name,
        **extra,
    )
    return agent_settings, settings.HttpDestinationSettings(url=forward, timeout_s=timeout_s)


def _token(token: str | None, token_file: pathlib.Path | None) -> str:
    if token and token_file:
        raise errors.ConfigError(
            "give the token once: --token / STOWHOOK_TOKEN or --token-file, not both"
        )
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise errors.ConfigError(f"cannot read the token file {token_file}: {exc}") from None
        if not token:
            raise errors.ConfigError(f"the token file {token_file} is empty")
    if not token:
        raise errors.ConfigError("no agent token: use --token / STOWHOOK_TOKEN or --token-file")
    return token


async def _serve(
    agent_settings: settings.AgentSettings, http_settings: settings.HttpDestinationSettings
) -> None:
    async with http.HttpDestination(http_settings) as destination:
        relay = agent.Agent(agent_settings, destination)
        with stop_on_signals(relay.stop):
            await relay.run()


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call `stop` (graceful shutdown) while the block runs."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _run_loop(coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(coro)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # optional speed-up, not a dependency
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _fail(exc: errors.AgentError) -> None:
    code, message = _exit_for(exc)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _exit_for(exc: errors.AgentError) -> tuple[int, str]:
    if isinstance(exc, errors.TokenRefused):
        key_id = exc.key_id or "unknown"
        return (
            EXIT_TOKEN_REFUSED,
            f"the server refused the token (key id {key_id}): check --token / STOWHOOK_TOKEN",
        )
    if isinstance(exc, errors.BucketRefused):
        return EXIT_BUCKET_REFUSED, str(exc)
    if isinstance(exc, errors.ConfigError):
        return EXIT_CONFIG, str(exc)
    return EXIT_FATAL, str(exc)
