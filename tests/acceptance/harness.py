"""Real processes on loopback: a relay-server, relay-agents, and a recording HTTP target."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, web

from bench.procs import free_port

BIN = pathlib.Path(sys.executable).parent
FAST_RETRIES = (
    "--retry-initial",
    "200ms",
    "--retry-cap",
    "1s",
    "--poll-interval",
    "100ms",
    "--lease-ms",
    "3000",
)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Relay:
    """One relay-server installation in a temporary folder."""

    home: pathlib.Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    input_id: str = ""
    token: str = ""
    starts: int = 0
    http_ssl: ssl.SSLContext | None = None  # set when the server serves HTTPS: trusts its CA
    postgres_url: str = ""  # a PostgreSQL database (tests/pg.py) instead of <home>/var's SQLite

    @property
    def db_path(self) -> pathlib.Path:
        return self.home / "var" / "stowhook.db"

    @property
    def database_url(self) -> str:
        return self.postgres_url or f"sqlite:///{self.db_path}"

    @property
    def base_args(self) -> list[str]:
        return [
            "--database-url",
            self.database_url,
            "--key-file",
            str(self.home / "var" / "stowhook.key"),
            "--public-url",
            f"http://127.0.0.1:{self.http_port}",
        ]

    def write_config(self, **serve: str | int) -> pathlib.Path:
        """<home>/relay.toml: this installation's database, key and ports, and `serve` keys."""
        config = self.home / "relay.toml"
        lines = [
            f'database_url = "{self.database_url}"',
            f'key_file = "{self.home / "var" / "stowhook.key"}"',
            "[serve]",
            f'http_listen = "127.0.0.1:{self.http_port}"',
            f'grpc_listen = "127.0.0.1:{self.grpc_port}"',
            *(f"{key} = {json.dumps(value)}" for key, value in serve.items()),
        ]
        config.write_text("\n".join(lines) + "\n")
        return config

    @property
    def http_base(self) -> str:
        return f"{'http' if self.http_ssl is None else 'https'}://127.0.0.1:{self.http_port}"

    def input_url(self, input_id: str | None = None, tail: str = "") -> str:
        return f"{self.http_base}/in/{input_id or self.input_id}{tail}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "relay-server"),
            *self.base_args,
            "--log-format",
            "json",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        result = subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())
        if check and result.returncode != 0:
            raise AssertionError(f"relay-server {' '.join(args)} failed: {result.stderr}")
        return result

    async def cli_json(self, *args: str) -> Any:
        return json.loads((await self.cli(*args, "--json")).stdout)

    async def setup(self, template: pathlib.Path | None = None) -> None:
        """Key, schema, quickstart bucket with one input and one agent token.

        With `template` (a folder an earlier setup() made), its var/ is copied instead:
        the same ids and token, a private database.
        """
        if template is not None:
            shutil.copytree(template / "var", self.home / "var")
        else:
            await self.cli("quickstart", "--grpc-address", self.grpc_address)
        self.token = (self.home / "var" / "quickstart-agent.token").read_text().strip()
        known = self.home / "var" / "quickstart-input.id"  # saves a CLI call per copy
        if template is not None and known.exists():
            self.input_id = known.read_text()
        else:
            self.input_id = (await self.cli_json("input", "list"))[0]["id"]
            known.write_text(self.input_id)

    def start(self, *extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        self.starts += 1
        with open(self.home / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "relay-server"),
                    *self.base_args,
                    "--log-format",
                    "json",
                    "serve",
                    "--http-listen",
                    f"127.0.0.1:{self.http_port}",
                    "--grpc-listen",
                    f"127.0.0.1:{self.grpc_port}",
                    *FAST_RETRIES,
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
            )

    def start_plain(self, env: dict[str, str]) -> None:
        """`relay-server serve` with no arguments: everything from `env` and files."""
        self.starts += 1
        with open(self.home / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "relay-server"), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                env={**os.environ, **env},
            )

    async def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        async with ClientSession() as session:
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.log_text()
                with contextlib.suppress(OSError):
                    url = f"{self.http_base}/healthz"
                    async with session.get(url, ssl=self.http_ssl or True) as r:
                        if r.status == 200 and _port_open(self.grpc_port):
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not ready:\n{self.log_text()}")
                await asyncio.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def log_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.home.glob("server-*.log"))
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a `--log-format json` log, in order (other lines are skipped).

    A last line still being written (no newline yet) is left for the next read.
    """
    complete = text if text.endswith("\n") else text.rpartition("\n")[0]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


def logged_at(event: dict[str, Any]) -> float:
    """A log event's timestamp in seconds since the epoch (comparable with time.time())."""
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def logged(name: str, *, since: float = 0.0, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    """A wait_logged() matcher: event `name` with these field values, logged at `since` or later."""

    def match(event: dict[str, Any]) -> bool:
        return (
            event.get("event") == name
            and all(event.get(key) == value for key, value in fields.items())
            and (not since or logged_at(event) >= since)
        )

    return match


async def wait_logged(
    read: Callable[[], str], match: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    """The first event of a JSON log (`read()` gives its text) that `match`es, once logged."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [event for event in log_events(read()) if match(event)][:1]
        return bool(found)

    await wait_until(logged, timeout, what)
    return found[0]


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    log: pathlib.Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    async def wait_exit(self, timeout: float = 20) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout, "agent to exit")
        return int(self.proc.returncode)


def start_agent(
    relay: Relay,
    forward: str,
    *extra: str,
    token: str | None = None,
    bucket: str = "quickstart",
    name: str = "agent",
    tls: bool = False,
    server: str | None = None,
) -> Agent:
    """`server`: another HOST:PORT to dial than the relay's gRPC port (e.g. a proxy's)."""
    log = relay.home / f"{name}.log"
    env = {**os.environ, "STOWHOOK_TOKEN": token if token is not None else relay.token}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "relay-agent"),
                "run",
                "--server",
                server or relay.grpc_address,
                *([] if tls else ["--insecure"]),
                "--bucket",
                bucket,
                "--forward",
                forward,
                "--log-format",
                "json",
                "--name",
                name,
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Agent(proc=proc, log=log)


def start_agent_args(
    relay: Relay,
    *args: str,
    name: str = "agent",
    token: str | None = None,
    env: dict[str, str] | None = None,
) -> Agent:
    """`relay-agent ARGS...` with its output in <home>/<name>.log; the token in the env."""
    log = relay.home / f"{name}.log"
    environ = {**os.environ, "STOWHOOK_TOKEN": token if token is not None else relay.token}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "relay-agent"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**environ, **(env or {})},
        )
    return Agent(proc=proc, log=log)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class Target:
    """An internal HTTP service that records every request it gets."""

    def __init__(self, respond: Callable[[int, web.Request], Any] | None = None) -> None:
        self.received: list[Received] = []
        self.port = free_port()
        self._respond = respond
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Target:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Hung handlers (tests of stuck destinations) must not hold up teardown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                method=request.method,
                path=request.rel_url.raw_path,
                query=request.rel_url.raw_query_string,
                headers=list(request.headers.items()),
                body=body,
                at=time.monotonic(),
            )
        )
        answer = self._respond(len(self.received), request) if self._respond else None
        if asyncio.iscoroutine(answer):
            answer = await answer
        return answer if isinstance(answer, web.StreamResponse) else web.Response(status=200)

    def event_ids(self) -> list[str]:
        return [r.header("X-Stowhook-Event-Id") or "" for r in self.received]

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        await wait_until(
            lambda: len(self.received) >= count,
            timeout,
            f"{count} requests at the target (got {len(self.received)})",
        )


def agent_env(relay: Relay, token: str | None = None) -> dict[str, str]:
    """The environment for a relay-agent process or an SDK worker: the token, nothing else new."""
    return {**os.environ, "STOWHOOK_TOKEN": token if token is not None else relay.token}


def pull_args(relay: Relay, *extra: str, bucket: str = "quickstart") -> list[str]:
    """`relay-agent pull` against `relay` (plaintext, JSON logs), for a shell or exec."""
    return [
        str(BIN / "relay-agent"),
        "pull",
        "--server",
        relay.grpc_address,
        "--insecure",
        "--bucket",
        bucket,
        "--log-format",
        "json",
        *extra,
    ]


async def delivery_states(relay: Relay) -> dict[str, dict[str, Any]]:
    """Event id -> its (only) delivery, as `relay-server event list --json` shows it."""
    events = await relay.cli_json("event", "list", "--limit", "1000")
    return {event["id"]: event["deliveries"][0] for event in events}


async def wait_deliveries(
    relay: Relay, done: Callable[[dict[str, dict[str, Any]]], bool], timeout: float, what: str
) -> dict[str, dict[str, Any]]:
    """delivery_states(relay), polled until `done` holds for it."""
    deadline = time.monotonic() + timeout
    while not done(found := await delivery_states(relay)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {found}")
        await asyncio.sleep(0.2)
    return found


async def assert_delivered_once(relay: Relay, event_id: str) -> list[dict[str, Any]]:
    """The event is delivered, settled by one ACK, of its last attempt; its attempts.

    As `relay-server event show --json` tells it: oldest first, the ACK last.
    """
    detail = await relay.cli_json("event", "show", event_id)
    (delivery,) = detail["summary"]["deliveries"]
    attempts: list[dict[str, Any]] = detail["attempts"]
    acks = [a["attempt"] for a in attempts if a["outcome"] == "ack"]
    history = attempt_history(attempts)
    assert delivery["state"] == "delivered", f"event {event_id} is {delivery['state']}: {history}"
    assert acks == [delivery["attempts"]], (
        f"event {event_id} was not settled by exactly one ACK, of its last attempt: {history}"
    )
    return attempts


def attempt_history(attempts: list[dict[str, Any]]) -> str:
    """'#1 lease_expired by reaper, #2 ack by shk_…/agent'."""
    return ", ".join(f"#{a['attempt']} {a['outcome']} by {a['agent']}" for a in attempts)
