"""`relay-agent pull`: lease events and print them as JSON lines, for shell pipes.

    relay-agent pull --server relay.example.com:7443 --token-file agent.token \\
        --bucket github --max 10 | jq -r .body

One JSON object per line on stdout; logs go to stderr. An event is ACKed only once its
line has left pull: written and flushed to a file or a terminal, or, when stdout is a
pipe, read out of the pipe by the reader. Lines go into a pipe one at a time, so a reader
that stops early (`| head -n 2`) takes exactly the lines it asked for; every event it
did not take is NACKed with a retry after 1 ms: it stays queued, available at once.

Exit codes as for `run`: 0 done (--max reached, --wait passed without a new event, the
reader went away, SIGTERM or SIGINT); 1 the server was not reached within
--connect-timeout, or another fatal error; 2 bad configuration; 3 token refused;
4 bucket refused.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import fcntl
import json
import os
import select
import socket
import stat
import struct
import sys
import termios
from typing import Any, BinaryIO

import click
import structlog

from relay_agent import consumer, errors, models, settings
from relay_agent import logging as agent_logging

log = structlog.get_logger(__name__)

DEFAULT_WAIT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 30.0
# Events leased ahead of printing. --max N asks for fewer, so that it leases no more than N.
PULL_IN_FLIGHT = 16
# A dry run holds every printed event until it exits: it can show this many at most
# (the server may grant fewer: its own cap per stream).
DRY_RUN_IN_FLIGHT = 1000
# While a line waits in a pipe, look whether the reader took it this often (growing).
_FIRST_POLL_S = 0.0005
_MAX_POLL_S = 0.05
# NACK reasons (each delivery's last error) of the events pull leased but did not ACK.
_RELEASE_REASON = "pull: not printed, or its line was not read"
_DRY_RUN_REASON = "pull --no-ack: dry run, put back unacknowledged"

# Options shared with `run`, reused from its definitions (see register()).
_SHARED_OPTIONS = (
    "server",
    "token",
    "token_file",
    "buckets",
    "ca_file",
    "insecure",
    "tls_server_name",
    "client_cert",
    "client_key",
    "agent_name",
    "log_format",
    "log_level",
)
_OVERRIDES: dict[str, dict[str, Any]] = {
    "server": {"help": "The server's gRPC address."},
    "buckets": {"help": "Bucket to lease events from (repeat for several)."},
    "agent_name": {"help": "Agent name shown by the server [default: pull@hostname]."},
    "log_level": {"default": "warning"},  # stderr stays quiet unless something is wrong
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PullPlan:
    """When pull stops, and whether it acknowledges what it printed."""

    max_events: int | None  # stop after printing this many; None: no limit
    wait_s: float  # stop once no new event has come for this long
    connect_timeout_s: float  # give up when no stream is open after this long
    ack: bool  # False: a dry run, every event is NACKed when pull exits


def register(group: click.Group) -> None:
    """Add `pull` to the relay-agent command, with `run`'s connection and log options."""
    if "pull" in group.commands:
        return
    run_options = {param.name: param for param in group.commands["run"].params}
    pull.params[:0] = [_adapted(run_options[name]) for name in _SHARED_OPTIONS]
    group.add_command(pull)


def _adapted(param: click.Parameter) -> click.Parameter:
    adapted = copy.copy(param)  # never change `run`'s own option
    for attribute, value in _OVERRIDES.get(param.name or "", {}).items():
        setattr(adapted, attribute, value)
    return adapted


@click.command("pull")
@click.option(
    "--max",
    "max_events",
    type=click.IntRange(min=1),
    metavar="N",
    help="Stop after printing N events [default: no limit].",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=DEFAULT_WAIT_S,
    show_default=True,
    metavar="SECONDS",
    help="Stop once no new event has come for this long.",
)
@click.option(
    "--connect-timeout",
    "connect_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_CONNECT_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="Exit 1 when the server cannot be reached within this long.",
)
@click.option(
    "--no-ack",
    "--nack-on-exit",
    "dry_run",
    is_flag=True,
    help="Dry run: acknowledge nothing. Each printed event stays leased until pull exits, "
    "then is NACKed (retry after 1 ms) so it stays queued; it counts as an attempt.",
)
def pull(
    log_format: agent_logging.LogFormat,
    log_level: str,
    max_events: int | None,
    wait_s: float,
    connect_timeout_s: float,
    dry_run: bool,
    token: str | None,
    token_file: Any,
    **options: Any,
) -> None:
    """Lease events and print each as one JSON line on stdout, then ACK it.

    An event is ACKed once its line is flushed, or read by the reader when stdout is a
    pipe; events the reader did not take stay queued. Fields: id, bucket, input_id,
    method, path, query, headers ([name, value] pairs), body (text) or body_base64 (when
    not UTF-8), received_at, attempt, replay, lease_id.
    """
    # cli.py imports this module at its end to register `pull`: import it back lazily.
    from relay_agent import cli

    agent_logging.configure(log_format, log_level.lower())
    output = LineWriter(sys.stdout.buffer)
    plan = PullPlan(
        max_events=max_events, wait_s=wait_s, connect_timeout_s=connect_timeout_s, ack=not dry_run
    )
    try:
        agent_settings = pull_settings(
            token=cli._token(token, token_file), max_events=max_events, dry_run=dry_run, **options
        )
        if agent_settings.insecure:
            log.warning("insecure_transport", detail="--insecure: gRPC without TLS")
        cli._run_loop(pull_events(agent_settings, plan, output))
    except errors.AgentError as exc:
        cli._fail(exc)
    finally:
        if output.closed:
            silence_stdout()


def pull_settings(
    *,
    server: tuple[str, ...],
    token: str,
    buckets: tuple[str, ...],
    ca_file: Any,
    insecure: bool,
    tls_server_name: str | None,
    client_cert: Any,
    client_key: Any,
    agent_name: str | None,
    max_events: int | None,
    dry_run: bool,
) -> settings.AgentSettings:
    if not server:
        raise errors.ConfigError("--server HOST:PORT is required (or STOWHOOK_SERVER)")
    if not buckets:
        raise errors.ConfigError("--bucket NAME is required")
    return settings.AgentSettings(
        server=",".join(server),
        token=token,
        buckets=buckets,
        max_in_flight=in_flight(max_events, dry_run=dry_run),
        ca_file=ca_file,
        insecure=insecure,
        tls_server_name=tls_server_name,
        client_cert=client_cert,
        client_key=client_key,
        agent_name=agent_name or f"pull@{socket.gethostname()}",
    )


def in_flight(max_events: int | None, *, dry_run: bool) -> int:
    """How many events to lease at once: never more than --max."""
    ceiling = DRY_RUN_IN_FLIGHT if dry_run else PULL_IN_FLIGHT
    return ceiling if max_events is None else min(max_events, ceiling)


async def pull_events(
    agent_settings: settings.AgentSettings, plan: PullPlan, output: LineWriter
) -> int:
    """Print events until the plan says stop; returns how many were printed."""
    from relay_agent import cli  # see pull()

    interrupted = asyncio.Event()
    async with consumer.Consumer(agent_settings) as events:

        def stop() -> None:
            interrupted.set()
            events.stop()

        with cli.stop_on_signals(stop):
            try:
                if not await _connect(events, agent_settings.server, plan.connect_timeout_s):
                    return 0
                printed = await _print_events(events, plan, output, interrupted)
            finally:
                # Whatever is unsettled now goes back in one go, right before the stream
                # ends: NACKed earlier, it could be leased straight back to this stream.
                await events.close(reason=_RELEASE_REASON if plan.ack else _DRY_RUN_REASON)
    log.info("pull_finished", printed=printed, reader_gone=output.closed)
    return printed


async def _connect(events: consumer.Consumer, server: str, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            return await events.wait_connected()
    except TimeoutError:
        why = f": {events.last_error}" if events.last_error else ""
        raise errors.ConnectionLost(
            f"could not connect to {server} within {timeout_s:g}s{why}"
        ) from None


async def _print_events(
    events: consumer.Consumer, plan: PullPlan, output: LineWriter, interrupted: asyncio.Event
) -> int:
    printed = 0
    while plan.max_events is None or printed < plan.max_events:
        event = await _next_event(events, plan.wait_s)
        if event is None or not await output.write_line(event_line(event.delivery), interrupted):
            break  # an event whose line the reader did not take is released with the rest
        printed += 1
        if plan.ack:
            await _ack(event)
    return printed


async def _next_event(events: consumer.Consumer, wait_s: float) -> consumer.Event | None:
    try:
        async with asyncio.timeout(wait_s):
            return await anext(events)
    except (TimeoutError, StopAsyncIteration):
        return None


async def _ack(event: consumer.Event) -> None:
    try:
        await event.ack()
    except errors.LeaseLost as exc:
        # Printed, but the ACK did not count: the event will come again (at least once).
        log.warning("ack_not_applied", event_id=event.id, error=str(exc))


def event_record(delivery: models.Delivery) -> dict[str, Any]:
    """One event as pull prints it; the body as text when it is UTF-8, else base64."""
    record: dict[str, Any] = {
        "id": delivery.event_id,
        "bucket": delivery.bucket,
        "input_id": delivery.input_id,
        "method": delivery.method,
        "path": delivery.path,
        "query": delivery.query,
        "headers": [[name, value] for name, value in delivery.headers],
    }
    try:
        record["body"] = delivery.body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_base64"] = base64.b64encode(delivery.body).decode("ascii")
    record["received_at"] = delivery.received_at.isoformat()
    record["attempt"] = delivery.attempt
    record["replay"] = delivery.replay
    record["lease_id"] = delivery.lease_id
    return record


def event_line(delivery: models.Delivery) -> bytes:
    """The event as one line of JSON (JSON never holds a raw newline), without the newline."""
    return json.dumps(event_record(delivery), ensure_ascii=False).encode("utf-8")


class LineWriter:
    """Writes lines to stdout and tells whether the reader took each one.

    A flushed line has reached a file or a terminal. In a pipe it may still sit unread
    when the reader exits, so a line counts only once the pipe is empty again
    (FIONREAD), and the next line is written only then.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pipe = pipe_fd(stream)
        self.closed = False  # the reader went away

    async def write_line(self, line: bytes, interrupted: asyncio.Event) -> bool:
        """True once the reader has the line; False if it went away (or pull was
        interrupted) first. Raises FatalError when stdout cannot be written."""
        if self.closed:
            return False
        try:
            # A thread: a slow reader must not stop the event loop (and the heartbeats).
            await asyncio.to_thread(self._write, line + b"\n")
        except BrokenPipeError:
            self.closed = True
            return False
        except (OSError, ValueError) as exc:
            raise errors.FatalError(f"cannot write to stdout: {exc}") from exc
        if self._pipe is None:
            return True
        return await self._until_read(self._pipe, interrupted)

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    async def _until_read(self, fd: int, interrupted: asyncio.Event) -> bool:
        delay = _FIRST_POLL_S
        while unread_bytes(fd) > 0:
            if reader_gone(fd):
                self.closed = True
                return False
            if interrupted.is_set():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL_S)
        return True


def pipe_fd(stream: BinaryIO) -> int | None:
    """The stream's file descriptor if it is a pipe whose unread bytes can be counted."""
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        unread_bytes(fd)
    except (AttributeError, OSError, ValueError):
        return None
    return fd


def unread_bytes(fd: int) -> int:
    """Bytes written to the pipe that its reader has not read yet (Linux: either end)."""
    count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return count


def reader_gone(fd: int) -> bool:
    """The pipe has no reader left (poll reports an error on the writing end)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def silence_stdout() -> None:
    """The reader is gone: point stdout at /dev/null so that the interpreter's last flush
    does not fail (the idiom of the Python docs' "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        return  # not a real file descriptor (tests): nothing will be flushed to it
