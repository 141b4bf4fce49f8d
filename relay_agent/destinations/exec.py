"""The exec destination: run one process per event and judge it by its exit status.

The contract with the script (docs/destinations.md says the same for users):

* Command: `--exec 'PROGRAM ARGS'` is split like a shell would split it (shlex) and run
  directly, without a shell; `--shell` runs it with `/bin/sh -c` instead. It runs in the
  agent's working directory, in a new session (its own process group).
* stdin: the body, byte for byte, then end of file. A script need not read it.
* Environment: the agent's own, minus every `STOWHOOK_*` variable (the agent's token
  never reaches a script), plus:

      STOWHOOK_EVENT_ID      the event's id (UUIDv7): the same on every retry and replay
      STOWHOOK_BUCKET        bucket name
      STOWHOOK_OUTPUT        output name ("default" for a bucket's agent output)
      STOWHOOK_INPUT_ID      the input that received it
      STOWHOOK_METHOD        HTTP method
      STOWHOOK_PATH          path after /in/{input_id}: "" or starting with "/"
      STOWHOOK_QUERY         raw query string, without "?"
      STOWHOOK_ATTEMPT       1 for the first try
      STOWHOOK_RECEIVED_AT   when the server received it, ISO 8601 in UTC
                             (2024-05-01T12:00:00.123456Z)
      STOWHOOK_LEASE_ID      this attempt's lease
      STOWHOOK_REPLAY        "1" if a replay of a stored event created it, else "0"
      STOWHOOK_BODY_SIZE     length of the body in bytes
      STOWHOOK_HEADER_<NAME> one per header: the name upper-cased, every character
                             other than A-Z and 0-9 turned into "_" (Content-Type ->
                             STOWHOOK_HEADER_CONTENT_TYPE); repeated headers, or names
                             that map to the same variable, are joined with ", "
      STOWHOOK_RETRY_AFTER_FILE  a path in a fresh private directory, see exit 75

* Exit status: 0 = ACK. 75 (EX_TEMPFAIL) = NACK, retried after the number of seconds the
  script wrote to `$STOWHOOK_RETRY_AFTER_FILE` (e.g. `echo 30 > "$STOWHOOK_RETRY_AFTER_FILE"`;
  decimals allowed, capped at an hour, the server caps it at the bucket's backoff cap), or
  after the bucket's usual backoff when the file is missing or unreadable. Any other
  status, death by a signal, or a program that cannot be started = NACK with the bucket's
  backoff.
* Timeout (`--timeout`): SIGTERM to the whole process group, SIGKILL to it after
  `kill_grace_s` (2 s), then NACK. The agent extends the lease while the script runs.
* stdout and stderr: the last 4 KiB of each is logged after the run (`script_output`).
  Processes the script leaves running are not waited for once it has exited.

The child is started by asyncio's own subprocess support (`subprocess.Popen`, which
uses vfork/posix_spawn, so gRPC's fork handlers never run); the agent runs on the
standard event loop for that reason (see cli._run_loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import math
import os
import pathlib
import shutil
import signal
import stat
import tempfile
from collections.abc import Mapping, Sequence

import structlog

from relay_agent import models, settings

log = structlog.get_logger(__name__)

EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: "try again later"
MAX_RETRY_AFTER_MS = 3_600_000  # a script cannot park an event for more than an hour
ENV_PREFIX = "STOWHOOK_"
HEADER_ENV_PREFIX = "STOWHOOK_HEADER_"
RETRY_AFTER_FILE_NAME = "retry-after"
_RETRY_AFTER_MAX_BYTES = 64
# Once the child has exited, how long its pipes may stay open (processes it started
# may hold them) before they are closed: the output read so far is what is kept.
OUTPUT_DRAIN_S = 1.0
# After SIGKILL, how long to wait for the child to be gone.
KILL_WAIT_S = 5.0


class ExecDestination:
    """Runs the configured command once per delivery."""

    def __init__(
        self, destination_settings: settings.ExecDestinationSettings, environ: Mapping[str, str]
    ) -> None:
        self._settings = destination_settings
        self._environ = dict(environ)  # the agent's environment, given by the CLI

    async def __aenter__(self) -> ExecDestination:
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def deliver(self, delivery: models.Delivery) -> models.Outcome:
        with tempfile.TemporaryDirectory(
            prefix="stowhook-exec-", ignore_cleanup_errors=True
        ) as scratch:
            retry_file = pathlib.Path(scratch) / RETRY_AFTER_FILE_NAME
            env = child_environment(self._environ, delivery, retry_file)
            try:
                result = await run_process(
                    self._settings.argv,
                    env=env,
                    stdin=delivery.body,
                    timeout_s=self._settings.timeout_s,
                    kill_grace_s=self._settings.kill_grace_s,
                    output_limit=self._settings.output_limit_bytes,
                )
            except OSError as exc:
                return models.Nack(reason=f"cannot start the command: {exc.strerror or exc}")
            retry_after_ms = (
                read_retry_after(retry_file) if result.returncode == EXIT_TEMPFAIL else None
            )
        _log_output(result)
        return outcome(result, retry_after_ms, self._settings.timeout_s)

    async def close(self) -> None:
        """Nothing to release: every run cleans up after itself."""


def child_environment(
    environ: Mapping[str, str], delivery: models.Delivery, retry_after_file: pathlib.Path
) -> dict[str, str]:
    """The script's environment: ours without STOWHOOK_*, plus the event's metadata."""
    env = {name: value for name, value in environ.items() if not name.startswith(ENV_PREFIX)}
    env.update(
        {
            "STOWHOOK_EVENT_ID": delivery.event_id,
            "STOWHOOK_BUCKET": delivery.bucket,
            "STOWHOOK_OUTPUT": delivery.output,
            "STOWHOOK_INPUT_ID": delivery.input_id,
            "STOWHOOK_METHOD": delivery.method,
            "STOWHOOK_PATH": delivery.path,
            "STOWHOOK_QUERY": delivery.query,
            "STOWHOOK_ATTEMPT": str(delivery.attempt),
            "STOWHOOK_RECEIVED_AT": iso_utc(delivery.received_at),
            "STOWHOOK_LEASE_ID": delivery.lease_id,
            "STOWHOOK_REPLAY": "1" if delivery.replay else "0",
            "STOWHOOK_BODY_SIZE": str(len(delivery.body)),
            "STOWHOOK_RETRY_AFTER_FILE": str(retry_after_file),
        }
    )
    env.update(header_variables(delivery.headers))
    # A NUL cannot travel in the environment; nothing legitimate holds one.
    return {name: value.replace("\0", "") for name, value in env.items()}


def header_variables(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """STOWHOOK_HEADER_<NAME> for each header; repeats joined with ", " in order."""
    variables: dict[str, str] = {}
    for name, value in headers:
        key = HEADER_ENV_PREFIX + header_env_name(name)
        variables[key] = f"{variables[key]}, {value}" if key in variables else value
    return variables


def header_env_name(name: str) -> str:
    """Content-Type -> CONTENT_TYPE: upper case, anything but A-Z and 0-9 becomes "_"."""
    return "".join(char if char.isascii() and char.isalnum() else "_" for char in name.upper())


def iso_utc(moment: datetime.datetime) -> str:
    """2024-05-01T12:00:00.123456Z: ISO 8601 in UTC, always with microseconds."""
    utc = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def read_retry_after(path: pathlib.Path) -> int | None:
    """The delay a script asked for in its retry-after file, in ms; None if none or unreadable.

    Only a regular file is read, without following a symlink and without blocking: a
    script must not be able to stall the agent with a FIFO in its place.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("retry_after_unreadable", detail="not a regular file")
            return None
        raw = os.read(fd, _RETRY_AFTER_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > _RETRY_AFTER_MAX_BYTES:
        log.warning("retry_after_unreadable", detail="longer than a number of seconds")
        return None
    return parse_retry_after(raw)


def parse_retry_after(raw: bytes) -> int | None:
    """Seconds (decimals allowed) as milliseconds, capped at an hour; None if not a number."""
    try:
        seconds = float(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        log.warning("retry_after_unreadable", detail="expected a number of seconds")
        return None
    if not math.isfinite(seconds) or seconds < 0:
        log.warning("retry_after_unreadable", detail="expected a number of seconds >= 0")
        return None
    return min(round(seconds * 1000), MAX_RETRY_AFTER_MS)


def outcome(result: Result, retry_after_ms: int | None, timeout_s: float) -> models.Outcome:
    """ACK for exit 0; NACK for everything else, with the script's delay after exit 75."""
    code = result.returncode
    if result.timed_out:
        return models.Nack(reason=f"timed out after {timeout_s:g}s: process group killed")
    if code == 0:
        return models.Ack()
    if code == EXIT_TEMPFAIL:
        return models.Nack(
            retry_after_ms=retry_after_ms, reason=f"exit status {code} (try again later)"
        )
    if code is None:
        return models.Nack(reason="the process did not end")
    if code < 0:
        return models.Nack(reason=f"killed by {_signal_name(-code)}")
    return models.Nack(reason=f"exit status {code}")


def program_problem(program: str, search_path: str | None) -> str | None:
    """Why `program` could not be started, or None (blocking: looks at the file system).

    A name without "/" is looked up in `search_path` (the PATH the script will get).
    """
    if "/" not in program:
        if shutil.which(program, path=search_path) is None:
            return f"the exec program {program!r} is not in PATH"
        return None
    if not os.path.isfile(program):
        return f"the exec program {program} does not exist"
    if not os.access(program, os.X_OK):
        return f"the exec program {program} is not executable (chmod +x)"
    return None


def _log_output(result: Result) -> None:
    if not (result.stdout or result.stderr):
        return
    log.info(
        "script_output",
        exit_status=result.returncode,
        stdout=result.stdout.decode("utf-8", "replace"),
        stderr=result.stderr.decode("utf-8", "replace"),
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---- running the child ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """How a child process ended, and the end of what it printed."""

    returncode: int | None  # negative: killed by that signal; None: never reaped
    timed_out: bool = False
    stdout: bytes = b""  # at most output_limit bytes: the end
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: bytes,
    timeout_s: float,
    kill_grace_s: float,
    output_limit: int,
) -> Result:
    """Run `argv` to its end or its deadline. Raises OSError if it cannot be started.

    The child leads a new session (its own process group), so a deadline ends all it
    started: SIGTERM to the group, SIGKILL after `kill_grace_s`. Cancellation kills the
    group at once. Only the last `output_limit` bytes of stdout and of stderr are kept.
    """
    loop = asyncio.get_running_loop()
    # The protocol API rather than create_subprocess_exec: on Python 3.11 Process.wait()
    # does not return while a grandchild still holds the pipes; process_exited() does.
    transport, child = await loop.subprocess_exec(
        lambda: _Child(loop, output_limit),
        *argv,
        env=dict(env),
        start_new_session=True,  # its own process group: a deadline ends all of it
    )
    try:
        stdin_pipe = transport.get_pipe_transport(0)
        if isinstance(stdin_pipe, asyncio.WriteTransport):
            # Buffered and written as the child reads; a child that exits or closes its
            # stdin first just ends the writing (EPIPE is not reported as an error).
            stdin_pipe.write(stdin)
            stdin_pipe.close()
        timed_out = not await _within(child.exited, timeout_s)
        if timed_out:
            await _kill_group(transport.get_pid(), child, timeout_s, kill_grace_s)
        await _within(child.output_closed, OUTPUT_DRAIN_S)
        return Result(
            returncode=transport.get_returncode(),
            timed_out=timed_out,
            stdout=bytes(child.stdout.data),
            stderr=bytes(child.stderr.data),
            stdout_truncated=child.stdout.truncated,
            stderr_truncated=child.stderr.truncated,
        )
    finally:
        if transport.get_returncode() is None:
            # Cancelled (lease lost, shutdown): no grace, the outcome is not wanted.
            signal_group(transport.get_pid(), signal.SIGKILL)
            await _within(child.exited, KILL_WAIT_S)  # reaped by asyncio's child watcher
        transport.close()  # closes pipes that processes it left behind may still hold


async def _kill_group(pgid: int, child: _Child, timeout_s: float, kill_grace_s: float) -> None:
    log.warning("script_timed_out", timeout_s=timeout_s, pid=pgid, signal="SIGTERM")
    signal_group(pgid, signal.SIGTERM)
    if not await _within(child.exited, kill_grace_s):
        log.warning("script_killed", pid=pgid, signal="SIGKILL")
    signal_group(pgid, signal.SIGKILL)  # even if the leader obeyed, what it started may not
    await _within(child.exited, KILL_WAIT_S)


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send a signal to a process group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def _within(awaitable: asyncio.Future[None], timeout_s: float) -> bool:
    """Whether `awaitable` is done within `timeout_s` (it is not cancelled if not)."""
    try:
        await asyncio.wait_for(asyncio.shield(awaitable), timeout_s)
    except TimeoutError:
        return False
    return True


class _Tail:
    """The last `limit` bytes written to a pipe."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.truncated = False
        self._limit = limit

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self._limit:
            del self.data[: -self._limit]
            self.truncated = True


class _Child(asyncio.SubprocessProtocol):
    """Keeps the tails of stdout and stderr; tells when the child exits and they close."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.stdout = _Tail(limit)
        self.stderr = _Tail(limit)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()
        self._open_outputs = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).add(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_outputs.discard(fd)  # fd 0 (stdin) closing is not our concern
        if not self._open_outputs and not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
