"""The `relay-agent` command. The only place that reads the environment or files
(config.py reads the config file and the token files it names, when called from here).

Exit codes: 0 after a clean stop; 2 bad configuration or usage; 3 the server refused the
token; 4 the server refused a bucket; 1 any other fatal error. `check` exits 0 only when
the file is valid and every subscription could connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import click
import structlog

import relay_agent
from relay_agent import config, connection, errors, models, settings, supervisor
from relay_agent import logging as agent_logging
from relay_agent import metrics as agent_metrics
from relay_agent.destinations import dir as dir_destination
from relay_agent.destinations import exec as exec_destination

log = structlog.get_logger(__name__)

EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_TOKEN_REFUSED = 3
EXIT_BUCKET_REFUSED = 4
# `check`: how long one subscription may take to be welcomed by the server.
CHECK_TIMEOUT_S = 15.0

_LOG_LEVELS = ("debug", "info", "warning", "error")
_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


@click.group()
@click.version_option(relay_agent.__version__, prog_name="relay-agent")
def main() -> None:
    """Stowhook relay agent: forwards stored webhooks from a Stowhook server."""


def _token_options(command: _F) -> _F:
    command = click.option(
        "--token-file",
        envvar="STOWHOOK_TOKEN_FILE",
        show_envvar=True,
        type=click.Path(dir_okay=False, path_type=pathlib.Path),
        help="File holding the agent token (surrounding whitespace is ignored).",
    )(command)
    return click.option(
        "--token",
        envvar="STOWHOOK_TOKEN",
        show_envvar=True,
        metavar="KEY_ID.SECRET",
        help="Agent token. Prefer --token-file or the environment: arguments are visible in ps.",
    )(command)


def _log_options(command: _F) -> _F:
    command = click.option(
        "--log-level",
        type=click.Choice(_LOG_LEVELS, case_sensitive=False),
        default="info",
        show_default=True,
    )(command)
    return click.option(
        "--log-format",
        type=click.Choice(["auto", "console", "json"]),
        default="auto",
        show_default=True,
        envvar="STOWHOOK_LOG_FORMAT",
        show_envvar=True,
        help="auto: JSON unless stderr is a terminal.",
    )(command)


@main.command()
@click.option(
    "-c",
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="TOML file with one or more [[subscription]]s (see docs/agent-config.md); "
    "it replaces --server, --bucket, the destination and connection options.",
)
@click.option(
    "--server",
    multiple=True,
    envvar="STOWHOOK_SERVER",
    show_envvar=True,
    metavar="HOST:PORT",
    help="The server's gRPC address (required without -c). Several replicas: repeat it (or "
    "give HOST:PORT,HOST:PORT); each reconnect dials the next one in turn.",
)
@_token_options
@click.option(
    "--bucket",
    "buckets",
    multiple=True,
    metavar="NAME",
    help="Bucket to receive events from (repeat for several; required without -c).",
)
@click.option(
    "--output",
    default=settings.DEFAULT_OUTPUT,
    show_default=True,
    metavar="NAME",
    help="Which of each bucket's outputs to consume (relay-server output list).",
)
@click.option("--forward", metavar="URL", help="Destination: forward each event to this URL.")
@click.option(
    "--exec",
    "exec_command",
    metavar="COMMAND",
    help="Destination: run COMMAND once per event, body on stdin, metadata in STOWHOOK_* "
    "environment variables; exit 0 = ACK, 75 = retry later (see docs/destinations.md).",
)
@click.option(
    "--shell", is_flag=True, help="Run the --exec COMMAND with /bin/sh -c instead of directly."
)
@click.option(
    "--dir",
    "dir_path",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    metavar="PATH",
    help="Destination: write one file per event into this directory (fsynced, then ACKed).",
)
@click.option(
    "--dir-format",
    type=click.Choice([item.value for item in settings.DirFormat]),
    help="json: one JSON envelope per event; raw: <name>.body plus <name>.meta.json "
    "[default: json].",
)
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
    metavar="SECONDS",
    help="Time the destination gets per event before the event is NACKed (--forward, "
    f"--exec) [default: {settings.DEFAULT_HTTP_TIMEOUT_S:g}].",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="PEM file with the CA certificates to trust for the server (default: system roots).",
)
@click.option("--insecure", is_flag=True, help="Plaintext gRPC without TLS (tests, loopback).")
@click.option("--tls-server-name", help="Name to expect in the server's certificate.")
@click.option(
    "--client-cert",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="PEM certificate chain to present to a server that requires client certificates "
    "(mTLS; with --client-key).",
)
@click.option(
    "--client-key",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="The private key (PEM, unencrypted) of --client-cert.",
)
@click.option(
    "--keepalive-time",
    "keepalive_time_s",
    type=click.FloatRange(min=0, min_open=True),
    default=settings.DEFAULT_KEEPALIVE_TIME_MS // 1000,
    show_default=True,
    metavar="SECONDS",
    help="Ping the server after this long without activity on the connection. The server "
    "must allow pings this often (relay-server serve --grpc-min-agent-ping).",
)
@click.option(
    "--keepalive-timeout",
    "keepalive_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=settings.DEFAULT_KEEPALIVE_TIMEOUT_MS // 1000,
    show_default=True,
    metavar="SECONDS",
    help="Count the connection as dead, and reconnect, when a ping is not answered within "
    "this: a path that silently drops packets is noticed after about time + timeout.",
)
@click.option("--name", "agent_name", help="Agent name shown by the server [default: hostname].")
@click.option(
    "--metrics-listen",
    envvar="STOWHOOK_METRICS_LISTEN",
    metavar="HOST:PORT",
    help="Serve /healthz and Prometheus /metrics here (e.g. 127.0.0.1:9464); off by default. "
    "Also `metrics_listen` at the top of a config file.",
)
@_log_options
@click.pass_context
def run(
    ctx: click.Context,
    /,
    log_format: agent_logging.LogFormat,
    log_level: str,
    config_file: pathlib.Path | None,
    metrics_listen: str | None,
    token: str | None,
    token_file: pathlib.Path | None,
    **options: Any,
) -> None:
    """Receive events and hand them to a destination until SIGTERM or SIGINT.

    Give exactly one destination (--forward, --exec or --dir), or a config file with -c.
    """
    agent_logging.configure(log_format, log_level.lower())
    try:
        if config_file is not None:
            _refuse_flags_with_config(ctx, options)
            agent_config = config.load(
                config_file,
                environ=os.environ,
                fallback_token=_optional_token(token, token_file),
            )
        else:
            agent_config = _flags_config(token=token, token_file=token_file, **options)
        if metrics_listen:
            agent_config = dataclasses.replace(agent_config, metrics_listen=metrics_listen)
        _check_destinations(agent_config, os.environ)
        for subscription in agent_config.subscriptions:
            if subscription.agent.insecure:
                log.warning(
                    "insecure_transport",
                    buckets=list(subscription.agent.buckets),
                    detail="gRPC without TLS",
                )
        _run_loop(serve(agent_config, dict(os.environ)), fast=not _runs_scripts(agent_config))
    except errors.AgentError as exc:
        _fail(exc)


def _refuse_flags_with_config(ctx: click.Context, options: dict[str, Any]) -> None:
    given = [
        max(param.opts, key=len)
        for param in ctx.command.params
        if param.name in options
        and ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        raise errors.ConfigError(
            f"-c/--config replaces {', '.join(given)}: set that in the config file instead"
        )


def _flags_config(
    *,
    server: tuple[str, ...],
    token: str | None,
    token_file: pathlib.Path | None,
    buckets: tuple[str, ...],
    output: str,
    max_in_flight: int,
    ca_file: pathlib.Path | None,
    insecure: bool,
    tls_server_name: str | None,
    client_cert: pathlib.Path | None,
    client_key: pathlib.Path | None,
    keepalive_time_s: float,
    keepalive_timeout_s: float,
    agent_name: str | None,
    **destination_options: Any,
) -> settings.AgentConfig:
    """One subscription from the command line."""
    if not server:
        raise errors.ConfigError("--server HOST:PORT is required (or a config file with -c)")
    if not buckets:
        raise errors.ConfigError("--bucket NAME is required (or a config file with -c)")
    destination = _flags_destination(**destination_options)
    extra: dict[str, Any] = {"agent_name": agent_name} if agent_name else {}
    agent_settings = settings.AgentSettings(
        server=",".join(server),
        token=_token(token, token_file),
        buckets=buckets,
        output=output,
        max_in_flight=max_in_flight,
        ca_file=ca_file,
        insecure=insecure,
        tls_server_name=tls_server_name,
        client_cert=client_cert,
        client_key=client_key,
        keepalive_time_ms=settings.whole_ms(keepalive_time_s),
        keepalive_timeout_ms=settings.whole_ms(keepalive_timeout_s),
        **extra,
    )
    subscription = settings.Subscription(agent=agent_settings, destination=destination)
    return settings.AgentConfig(subscriptions=(subscription,))


def _flags_destination(
    *,
    forward: str | None,
    exec_command: str | None,
    shell: bool,
    dir_path: pathlib.Path | None,
    dir_format: str | None,
    timeout_s: float | None,
) -> settings.DestinationSettings:
    given = [
        flag
        for flag, value in (("--forward", forward), ("--exec", exec_command), ("--dir", dir_path))
        if value is not None
    ]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        raise errors.ConfigError(
            f"give exactly one destination: --forward URL, --exec COMMAND or --dir PATH{got}"
        )
    if shell and exec_command is None:
        raise errors.ConfigError("--shell applies only to --exec")
    if dir_format is not None and dir_path is None:
        raise errors.ConfigError("--dir-format applies only to --dir")
    if forward is not None:
        timeout = settings.DEFAULT_HTTP_TIMEOUT_S if timeout_s is None else timeout_s
        return settings.HttpDestinationSettings(url=forward, timeout_s=timeout)
    if exec_command is not None:
        timeout = settings.DEFAULT_EXEC_TIMEOUT_S if timeout_s is None else timeout_s
        argv = settings.exec_argv(exec_command, shell=shell)
        return settings.ExecDestinationSettings(argv=argv, timeout_s=timeout)
    assert dir_path is not None
    if timeout_s is not None:
        raise errors.ConfigError("--timeout does not apply to --dir (writes are local)")
    fmt = settings.DirFormat(dir_format or settings.DirFormat.JSON)
    return settings.DirDestinationSettings(path=dir_path, format=fmt)


def _optional_token(token: str | None, token_file: pathlib.Path | None) -> str | None:
    return _token(token, token_file) if token or token_file else None


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


def _check_destinations(agent_config: settings.AgentConfig, environ: Mapping[str, str]) -> None:
    """Fail at start-up, not at the first event, when an exec program is missing."""
    for subscription in agent_config.subscriptions:
        if isinstance(subscription.destination, settings.ExecDestinationSettings):
            problem = _local_problem(subscription.destination, environ)
            if problem is not None:
                where = f"{subscription.label}: " if subscription.label else ""
                raise errors.ConfigError(f"{where}{problem}")


def _local_problem(
    destination: settings.DestinationSettings, environ: Mapping[str, str]
) -> str | None:
    """What is wrong on this machine with a destination, checked without changing anything."""
    match destination:
        case settings.ExecDestinationSettings(argv=argv):
            return exec_destination.program_problem(argv[0], environ.get("PATH"))
        case settings.DirDestinationSettings(path=path):
            return dir_destination.directory_problem(path)
    return None


async def serve(agent_config: settings.AgentConfig, environ: Mapping[str, str]) -> None:
    """Run one Agent per subscription until SIGTERM/SIGINT, or until one fails."""
    observed = agent_metrics.AgentMetrics() if agent_config.metrics_listen else None
    group = supervisor.Supervisor(agent_config, environ, metrics=observed)
    async with contextlib.AsyncExitStack() as stack:
        if observed is not None and agent_config.metrics_listen is not None:
            host, _, port = agent_config.metrics_listen.rpartition(":")
            listener = agent_metrics.MetricsServer(observed, host.strip("[]"), int(port))
            await stack.enter_async_context(listener)
            log.info("metrics_listening", address=f"{host}:{listener.port}")
        with stop_on_signals(group.stop):
            await group.run()


@main.command()
@click.option(
    "-c",
    "--config",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="The TOML config file to check.",
)
@_token_options
@_log_options
def check(
    config_file: pathlib.Path,
    token: str | None,
    token_file: pathlib.Path | None,
    log_format: agent_logging.LogFormat,
    log_level: str,
) -> None:
    """Validate a config file, then connect once per subscription and report.

    Nothing is received: each subscription is welcomed by the server, then closed.
    """
    agent_logging.configure(log_format, log_level.lower())
    try:
        agent_config = config.load(
            config_file, environ=os.environ, fallback_token=_optional_token(token, token_file)
        )
    except errors.AgentError as exc:
        _fail(exc)
    count = len(agent_config.subscriptions)
    click.echo(f"{config_file}: valid, {count} subscription{'s' if count > 1 else ''}")
    results = _run_loop(_check_all(agent_config, dict(os.environ)))
    for line, _error in results:
        click.echo(line)
    failures = [error for _line, error in results if error is not None]
    if failures:
        sys.exit(_exit_for(failures[0])[0])


async def _check_all(
    agent_config: settings.AgentConfig, environ: Mapping[str, str]
) -> list[tuple[str, errors.AgentError | None]]:
    return list(
        await asyncio.gather(
            *(
                _check_one(index, sub, environ)
                for index, sub in enumerate(agent_config.subscriptions)
            )
        )
    )


async def _check_one(
    index: int, subscription: settings.Subscription, environ: Mapping[str, str]
) -> tuple[str, errors.AgentError | None]:
    name = f"{subscription.label or f'subscription[{index}]'} " + (
        f"(bucket {', '.join(subscription.agent.buckets)} -> {_describe(subscription.destination)})"
    )
    problem = await asyncio.to_thread(_local_problem, subscription.destination, environ)
    if problem is not None:
        return f"FAIL  {name}: {problem}", errors.ConfigError(problem)
    try:
        welcome = await asyncio.wait_for(_connect_once(subscription.agent), CHECK_TIMEOUT_S)
    except TimeoutError:
        error: errors.AgentError = errors.ConnectionLost(
            f"no answer from {subscription.agent.server} within {CHECK_TIMEOUT_S:g}s"
        )
        return f"FAIL  {name}: {error}", error
    except errors.AgentError as exc:
        return f"FAIL  {name}: {_exit_for(exc)[1]}", exc
    granted = welcome.max_in_flight or subscription.agent.max_in_flight
    return (
        f"ok    {name}: connected to {subscription.agent.server} "
        f"(server {welcome.server_version or 'unknown'}, lease {welcome.lease_ms} ms, "
        f"max in flight {granted})",
        None,
    )


async def _connect_once(agent_settings: settings.AgentSettings) -> models.Welcome:
    async with connection.Connection(agent_settings) as conn:
        return await conn.open()


def _describe(destination: settings.DestinationSettings) -> str:
    """The destination in a few words, without anything that could be secret."""
    match destination:
        case settings.HttpDestinationSettings(url=url):
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return f"forward {parts.scheme}://{host}{port}{parts.path}"
        case settings.ExecDestinationSettings(argv=argv):
            return f"exec {argv[0]}" + (" ..." if len(argv) > 1 else "")
        case settings.DirDestinationSettings(path=path, format=fmt):
            return f"dir {path} ({fmt})"


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


def _run_loop(coro: Coroutine[Any, Any, _T], *, fast: bool = False) -> _T:
    """Run `coro` on uvloop when `fast` and uvloop is installed, else on asyncio's loop.

    uvloop takes about a sixth off the agent's CPU per event (its loop, transports and
    timers are C), which is what a drain of a backlog into a fast target spends. Agents
    that run scripts stay on asyncio: it starts exec children with subprocess.Popen
    (vfork/posix_spawn), so no gRPC fork handlers run, where uvloop's libuv forks.
    """
    if fast:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def _runs_scripts(agent_config: settings.AgentConfig) -> bool:
    return any(
        isinstance(subscription.destination, settings.ExecDestinationSettings)
        for subscription in agent_config.subscriptions
    )


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


from relay_agent import cli_service  # noqa: E402

cli_service.register(main)

from relay_agent import cli_pull  # noqa: E402

cli_pull.register(main)
