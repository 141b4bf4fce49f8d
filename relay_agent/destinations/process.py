"""One child process, run from the event loop: stdin fed, output tails kept, a deadline.

Why not `loop.subprocess_exec`: uvloop (the agent's loop when installed) starts children
with fork(), which makes gRPC print a warning to the agent's log for every process
and copies a large, threaded process; and it closes a child's stdin behind our back
when the child exits first. `subprocess.Popen` starts children with vfork()/exec, and
the pipes here are plain non-blocking file descriptors that this module alone opens
and closes, watched with `loop.add_reader`/`add_writer`, so both loops behave the same.
The exit is watched with a pidfd where there is one (Linux), else by polling.

The child leads a new session and process group, so a deadline can end everything it
started: SIGTERM to the group, SIGKILL after a grace. Only the last `output_limit`
bytes of stdout and of stderr are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import structlog

log = structlog.get_logger(__name__)

# Once the child has exited, how long its pipes may stay open (processes it started
# may hold them) before they are closed: the output read so far is what is kept.
OUTPUT_DRAIN_S = 1.0
# After SIGKILL, how long to wait for the child to be gone.
KILL_WAIT_S = 5.0
# On cancellation, how long the loop may block reaping a child it has just SIGKILLed.
_REAP_BLOCKING_S = 1.0
_POLL_S = 0.02  # exit polling interval where there is no pidfd
_CHUNK_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """How a child process ended, and the end of what it printed."""

    returncode: int | None  # negative: killed by that signal; None: never reaped
    timed_out: bool = False
    stdout: bytes = b""  # at most output_limit bytes: the end
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


async def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: bytes,
    timeout_s: float,
    kill_grace_s: float,
    output_limit: int,
) -> Result:
    """Run `argv` to its end or its deadline. Raises OSError if it cannot be started.

    Cancellation kills the process group at once.
    """
    child = _Child.start(argv, env, stdin, output_limit)
    try:
        exited = await child.wait_exit(timeout_s)
        if not exited:
            await _kill_group(child, timeout_s, kill_grace_s)
        child.reap()
        await child.wait_output(OUTPUT_DRAIN_S)
        return child.result(timed_out=not exited)
    finally:
        child.close()


async def _kill_group(child: _Child, timeout_s: float, kill_grace_s: float) -> None:
    pgid = child.pid
    log.warning("script_timed_out", timeout_s=timeout_s, pid=pgid, signal="SIGTERM")
    signal_group(pgid, signal.SIGTERM)
    if not await child.wait_exit(kill_grace_s):
        log.warning("script_killed", pid=pgid, signal="SIGKILL")
    # Even when the leader obeyed SIGTERM, what it started may not have. The leader is
    # not reaped yet, so the group id cannot have been reused.
    signal_group(pgid, signal.SIGKILL)
    await child.wait_exit(KILL_WAIT_S)


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send a signal to a process group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class _Child:
    """A started child and the three pipe ends the parent holds."""

    def __init__(
        self, proc: subprocess.Popen[bytes], fds: tuple[int, int, int], stdin: bytes, limit: int
    ) -> None:
        loop = asyncio.get_running_loop()
        self.proc = proc
        self.pid = proc.pid
        self.stdout = _Tail(limit)
        self.stderr = _Tail(limit)
        stdin_fd, stdout_fd, stderr_fd = fds
        self._writer = _PipeWriter(loop, stdin_fd, stdin)
        self._readers = (
            _PipeReader(loop, stdout_fd, self.stdout),
            _PipeReader(loop, stderr_fd, self.stderr),
        )
        self._exit = _ExitWatch(loop, proc)

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str], stdin: bytes, limit: int) -> _Child:
        # os.pipe() ends are close-on-exec; Popen dup2()s the child's ends onto 0, 1, 2.
        pipes = [os.pipe() for _ in range(3)]
        parent_ends = (pipes[0][1], pipes[1][0], pipes[2][0])
        child_ends = (pipes[0][0], pipes[1][1], pipes[2][1])
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=child_ends[0],
                stdout=child_ends[1],
                stderr=child_ends[2],
                env=dict(env),
                start_new_session=True,  # its own process group: a deadline ends all of it
                close_fds=True,
            )
        except BaseException:
            _close_all(parent_ends)
            raise
        finally:
            _close_all(child_ends)
        try:
            return cls(proc, parent_ends, stdin, limit)
        except BaseException:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            _close_all(parent_ends)
            raise

    async def wait_exit(self, timeout_s: float) -> bool:
        """Whether the child has exited within `timeout_s`."""
        return await self._exit.wait(timeout_s)

    async def wait_output(self, timeout_s: float) -> None:
        pending = {reader.done for reader in self._readers}
        await asyncio.wait(pending, timeout=timeout_s)

    def reap(self) -> None:
        self.proc.poll()

    def result(self, *, timed_out: bool) -> Result:
        return Result(
            returncode=self.proc.returncode,
            timed_out=timed_out,
            stdout=bytes(self.stdout.data),
            stderr=bytes(self.stderr.data),
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
        )

    def close(self) -> None:
        """Leave nothing behind: kill the group if the child still runs, reap, close fds."""
        try:
            if self.proc.poll() is None:
                # Cancelled (lease lost, shutdown): no grace, the outcome is not wanted.
                signal_group(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(_REAP_BLOCKING_S)
        finally:
            self._writer.close()
            for reader in self._readers:
                reader.close()
            self._exit.close()


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


class _PipeReader:
    """Reads a pipe into a _Tail until end of file, from the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, tail: _Tail) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._fd: int | None = fd
        self._tail = tail
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            chunk = os.read(self._fd, _CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._tail.add(chunk)
        else:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if not self.done.done():
            self.done.set_result(None)


class _PipeWriter:
    """Writes `data` to a pipe as the reader takes it, then closes it (end of file).

    A child that exits or closes its stdin without reading it all ends the writing
    (EPIPE): that is the child's choice, not an error.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
        self._loop = loop
        self._fd: int | None = fd
        self._view = memoryview(data)
        self._watching = False
        os.set_blocking(fd, False)
        self._on_writable()

    def _on_writable(self) -> None:
        if self._fd is None:
            return
        try:
            while self._view:
                written = os.write(self._fd, self._view[:_CHUNK_BYTES])
                self._view = self._view[written:]
        except BlockingIOError:
            if not self._watching:
                self._loop.add_writer(self._fd, self._on_writable)
                self._watching = True
            return
        except OSError:
            pass  # EPIPE: the child does not want (the rest of) its stdin
        self.close()

    def close(self) -> None:
        if self._fd is None:
            return
        if self._watching:
            self._loop.remove_writer(self._fd)
        os.close(self._fd)
        self._fd = None
        self._view = memoryview(b"")


class _ExitWatch:
    """Tells when a child has exited, without reaping it (pidfd), or by polling."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes]) -> None:
        self._loop = loop
        self._proc = proc
        self._exited: asyncio.Future[None] = loop.create_future()
        self._pidfd = _pidfd_open(proc.pid)
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._on_exit)

    async def wait(self, timeout_s: float) -> bool:
        if self._pidfd is not None or self._exited.done():
            done, _ = await asyncio.wait({self._exited}, timeout=timeout_s)
            return bool(done)
        deadline = self._loop.time() + timeout_s
        while self._proc.poll() is None:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(_POLL_S, remaining))
        return True

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(None)

    def close(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def _pidfd_open(pid: int) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:  # ENOSYS on old kernels
        return None
    return fd


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
