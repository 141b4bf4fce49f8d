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
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib
import shutil
import signal
import stat
import tempfile
from collections.abc import Mapping

import structlog

from relay_agent import models, settings
from relay_agent.destinations import process

log = structlog.get_logger(__name__)

EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: "try again later"
MAX_RETRY_AFTER_MS = 3_600_000  # a script cannot park an event for more than an hour
ENV_PREFIX = "STOWHOOK_"
HEADER_ENV_PREFIX = "STOWHOOK_HEADER_"
RETRY_AFTER_FILE_NAME = "retry-after"
_RETRY_AFTER_MAX_BYTES = 64


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
                result = await process.run(
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


def outcome(result: process.Result, retry_after_ms: int | None, timeout_s: float) -> models.Outcome:
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


def _log_output(result: process.Result) -> None:
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
