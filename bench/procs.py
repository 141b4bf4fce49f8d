"""The processes a bench run starts: spawn them, talk to them, measure them, stop them.

Every child is started inside a `Group`; leaving the group stops its children in reverse
order, SIGTERM first and SIGKILL after a grace, whatever happened inside. Children that
report results print JSON lines on stdout (`Child.message()` reads the next one); their
stderr goes to a log file in the run's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pathlib
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from aiohttp import ClientError, ClientSession, ClientTimeout

T = TypeVar("T")
BIN = pathlib.Path(sys.executable).parent
ROOT = pathlib.Path(__file__).resolve().parent.parent  # children import bench from here
STOP_GRACE_S = 15.0  # SIGTERM, then this long, then SIGKILL
READY_TIMEOUT_S = 60.0


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed (as relay-server does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _listen_ports() -> Iterator[int]:
    """Every port from 20000 up to the kernel's ephemeral range, from a random start."""
    low, high = 20000, _ephemeral_range()[0] - 1
    if high - low < 1000:  # the ephemeral range starts too low to leave room below it
        low, high = _ephemeral_range()[1] + 1, 65535
    start = random.randint(low, high)
    return itertools.cycle([*range(start, high + 1), *range(low, start)])


_ports = _listen_ports()


def free_port() -> int:
    """A loopback port nothing listens on, for a server this run starts.

    Not one the kernel picks (bind to port 0): that port goes back to the ephemeral pool
    when the probe closes, and any outgoing connection may take it before the server binds
    it; CI saw a relay fail with "address already in use" that way. Ports outside the
    ephemeral range are never given to outgoing connections, so only another listener can
    hold one; each process walks them from its own random start and checks each is free.
    """
    for _ in range(1000):
        port = next(_ports)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (VmRSS)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Child:
    """One child process; stdout is a pipe of JSON lines, stderr a log file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: pathlib.Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    async def message(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the child prints (other lines are skipped)."""
        assert self.proc.stdout is not None, f"{self.name} has no stdout pipe"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} printed no result within {timeout:g}s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise RuntimeError(f"{self.name} ended without a result:\n{self.tail()}")
            if line.startswith(b"{"):
                found: dict[str, Any] = json.loads(line)
                return found

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None, f"{self.name} has no stdin pipe"
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; idempotent."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class Group:
    """Children started together and stopped together (reverse order) on exit."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self._children: list[Child] = []

    async def __aenter__(self) -> Group:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop_all()

    async def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> Child:
        log = self.folder / f"{name}.log"
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        with open(log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONPATH": path, **(env or {})},
                cwd=self.folder,
                limit=16 * 1024 * 1024,  # one JSON line may hold many counts
            )
        child = Child(name, proc, log)
        self._children.append(child)
        return child

    async def python(self, name: str, module: str, *args: str, **options: Any) -> Child:
        """`python -m module args...` with this interpreter."""
        return await self.start(name, [sys.executable, "-m", module, *args], **options)

    async def stop_all(self) -> None:
        while self._children:
            await self._children.pop().stop()


async def wait_http(url: str, child: Child | None = None, timeout: float = READY_TIMEOUT_S) -> None:
    """Until GET `url` answers 200 (and `child`, if given, is still running)."""
    deadline = time.monotonic() + timeout
    async with ClientSession(timeout=ClientTimeout(total=5)) as session:
        while True:
            if child is not None and not child.running:
                raise RuntimeError(f"{child.name} exited early:\n{child.tail()}")
            with contextlib.suppress(ClientError, OSError, TimeoutError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} was not ready within {timeout:g}s")
            await asyncio.sleep(0.1)


class PeakRss:
    """Samples a process's RSS every `interval` seconds while the block runs; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(FileNotFoundError, RuntimeError):  # it may have exited
                self.peak = max(self.peak, rss_mib(self.pid))
            await asyncio.sleep(self.interval)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[PeakRss]:
        self._task = asyncio.create_task(self._sample(), name=f"rss-{self.pid}")
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            with contextlib.suppress(FileNotFoundError, RuntimeError):
                self.peak = max(self.peak, rss_mib(self.pid))
