"""Test 10: every admin action writes exactly one audit entry; no test secret is ever logged.

`MUTATING` names every `relay-server` command that changes something and the audit
action(s) it writes; `READ_ONLY` and `NOT_AUDITED` (with the reason) name the rest. The
first test walks the real click command tree, so a command added without a place in
these tables fails it; the second runs each mutating command through the real CLI
against a running server and agent, and checks the entry it wrote.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pathlib
import signal
import socket
import sqlite3
from collections.abc import Iterator
from typing import Any

import click
import pytest
from aiohttp import ClientSession, web

from relay_server import cli
from tests import tls
from tests.acceptance import harness

MUTATING: dict[str, set[str]] = {
    "account create": {"account.create"},
    "bucket auth": {"bucket.auth"},
    "bucket create": {"bucket.create"},
    "bucket delete": {"bucket.delete"},
    "bucket update": {"bucket.update"},
    "dlq replay": {"dlq.replay"},
    "event replay": {"event.replay"},
    "init": {"init"},
    "input create": {"input.create"},
    "input delete": {"input.delete"},
    "input limit": {"input.limit"},
    "input respond": {"input.respond"},
    "input verify": {"input.verify"},
    "keys remove": {"keys.remove"},
    "keys rotate": {"keys.rotate"},
    "output create": {"output.create"},
    "output delete": {"output.delete"},
    "output update": {"output.update"},
    "quickstart": {"quickstart"},
    "token bind": {"token.bind", "token.unbind"},
    "token create": {"token.create"},
    "token revoke": {"token.revoke"},
    "token rotate": {"token.rotate"},
}
READ_ONLY = {
    "account list",
    "audit list",
    "bucket list",
    "bucket show",
    "dlq list",
    "dlq show",
    "event list",
    "event show",
    "input list",
    "keys list",
    "output list",
    "status",
    "token list",
}
NOT_AUDITED = {
    "serve": "runs the server; what agents do through it is audited",
    "migrate": "upgrades the schema, which every command also does first",
    "keys generate": "writes a new key file, before any database exists",
    # Audited, but in the PostgreSQL target it copies to: test_migrate_data.py checks
    # its one data.migrate entry per run.
    "migrate-data": "audited in the target database (tests/acceptance/test_migrate_data.py)",
}

BASIC_PASSWORD = "correct-horse-battery-staple-7731"
SIGNING_SECRET = "whsec-signing-secret-5521"
CANARY = b'{"canary": "c4n4ry-b0dy-2f9e"}'


def leaf_commands(group: click.Group, prefix: str = "") -> Iterator[str]:
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from leaf_commands(command, path + " ")
        else:
            yield path


def test_every_command_is_classified_as_audited_read_only_or_exempt() -> None:
    commands = set(leaf_commands(cli.main))
    classified = set(MUTATING) | READ_ONLY | set(NOT_AUDITED)
    assert not commands - classified, f"commands without an audit rule: {commands - classified}"
    stale = classified - commands
    assert not stale, f"rules for commands that no longer exist: {stale}"


class Audited:
    """Runs CLI commands and checks the audit entry each one wrote."""

    def __init__(self, relay: harness.Relay) -> None:
        self.relay = relay
        self.ran: set[str] = set()
        self.stderr: list[str] = []

    def rows(self, after: int = 0) -> list[dict[str, Any]]:
        with sqlite3.connect(self.relay.db_path) as db:
            db.row_factory = sqlite3.Row
            found = db.execute("SELECT * FROM audit_log WHERE id > ? ORDER BY id", (after,))
            return [dict(row) for row in found]

    def last_id(self) -> int:
        rows = self.rows()
        return int(rows[-1]["id"]) if rows else 0

    async def run(
        self, command: str, *args: str, action: str, resource: str | None, json_flag: bool = True
    ) -> tuple[Any, dict[str, Any]]:
        """`relay-server COMMAND ARGS`: exactly one new entry, with this action (and resource)."""
        assert action in MUTATING[command]
        before = self.last_id()
        done = await self.relay.cli(*command.split(), *args, *(["--json"] if json_flag else []))
        self.stderr.append(done.stderr)
        # Agents connecting meanwhile write their own entries; the CLI's are `cli:<user>`.
        (entry,) = [row for row in self.rows(before) if row["actor"].startswith("cli")]
        assert (entry["action"], entry["result"]) == (action, "ok"), entry
        assert resource is None or entry["resource"] == resource, entry
        assert entry["source"] == socket.gethostname()
        self.ran.add(command)
        return (json.loads(done.stdout) if json_flag else None), entry


def event_states(relay: harness.Relay) -> dict[str, str]:
    with sqlite3.connect(relay.db_path) as db:
        return dict(db.execute("SELECT event_id, state FROM deliveries ORDER BY created_at"))


async def wait_state(relay: harness.Relay, event_id: str, state: str) -> None:
    await harness.wait_until(
        lambda: event_states(relay).get(event_id) == state, 30, f"{event_id} {state}"
    )


def poison_target(_n: int, request: web.Request) -> web.Response:
    return web.Response(status=500 if "poison" in request.path else 200)


async def post(url: str, body: bytes, status: int = 200, **headers: str) -> None:
    async with ClientSession() as session, session.post(url, data=body, headers=headers) as r:
        assert r.status == status, await r.text()


async def dead_event(relay: harness.Relay, other_than: str = "") -> str:
    found: list[str] = []

    def dead() -> bool:
        found[:] = [e for e, s in event_states(relay).items() if s == "dead" and e != other_than]
        return bool(found)

    await harness.wait_until(dead, 30, "a dead delivery")
    return found[0]


async def exercise(
    audit: Audited, relay: harness.Relay, files: pathlib.Path, target: harness.Target
) -> list[str]:
    """Every mutating command once (token bind twice); returns the token secrets it saw."""
    run = audit.run
    await run("account create", "acme", action="account.create", resource="account:acme")
    await run("bucket create", "audited", action="bucket.create", resource="bucket:audited")
    await run(
        "bucket update", "quickstart", "--max-attempts", "1",
        action="bucket.update", resource="bucket:quickstart",
    )  # fmt: skip
    await run(
        "bucket auth", "audited", "--basic", "alice", "--password-file", str(files / "password"),
        action="bucket.auth", resource="bucket:audited",
    )  # fmt: skip
    created, entry = await run(
        "input create", "--bucket", "audited", action="input.create", resource=None
    )
    input_id = created["id"]
    assert entry["resource"] == f"input:{input_id}"
    on_input = {"action": "", "resource": f"input:{input_id}"}
    for command, args in (
        ("input verify", ("--provider", "github", "--secret-file", str(files / "signing"))),
        ("input respond", ("--mode", "static", "--status", "202")),
        ("input limit", ("--rate", "100/s")),
    ):
        on_input["action"] = command.replace(" ", ".")
        await run(command, input_id, *args, **on_input)  # type: ignore[arg-type]
    for command, args in (
        ("output create", ()),
        ("output update", ("--ordered",)),
        ("output delete", ()),
    ):
        await run(
            command, "copy", "--bucket", "audited", *args,
            action=command.replace(" ", "."), resource="output:audited/copy",
        )  # fmt: skip
    secrets = await token_commands(audit, files)

    # Webhooks that use the basic-auth password, the signing secret and a canary body.
    signature = hmac.new(SIGNING_SECRET.encode(), CANARY, hashlib.sha256).hexdigest()
    basic = base64.b64encode(f"alice:{BASIC_PASSWORD}".encode()).decode()
    await post(
        relay.input_url(input_id), CANARY, 202,
        Authorization=f"Basic {basic}", **{"X-Hub-Signature-256": f"sha256={signature}"},
    )  # fmt: skip
    await post(relay.input_url(), CANARY)
    await target.wait_for(1)
    assert target.received[0].body == CANARY
    canary_id = target.event_ids()[0]
    await run("event replay", canary_id, action="event.replay", resource=f"event:{canary_id}")
    await target.wait_for(2)

    await post(relay.input_url(tail="/poison"), b"poison")
    dead = await dead_event(relay)
    await run("dlq replay", dead, action="dlq.replay", resource=f"event:{dead}")
    await wait_state(relay, dead, "dead")
    await run(
        "dlq replay", "--all", "--bucket", "quickstart",
        action="dlq.replay", resource="bucket:quickstart",
    )  # fmt: skip

    await run("input delete", input_id, action="input.delete", resource=f"input:{input_id}")
    await run(
        "bucket delete", "audited", "--force", action="bucket.delete", resource="bucket:audited"
    )
    await run("keys rotate", "--reload-wait", "2500ms", action="keys.rotate", resource="key:k2")
    await run("keys remove", "k1", action="keys.remove", resource="key:k1")
    await run("init", action="init", resource="account:default", json_flag=False)
    await run(
        "quickstart", "--grpc-address", relay.grpc_address,
        action="quickstart", resource="bucket:quickstart", json_flag=False,
    )  # fmt: skip
    return secrets


async def token_commands(audit: Audited, files: pathlib.Path) -> list[str]:
    cert = tls.Authority.create(files).issue("agent")
    created, _ = await audit.run(
        "token create", "--bucket", "quickstart", "--name", "ci",
        action="token.create", resource=None,
    )  # fmt: skip
    key_id = created["key_id"]
    on_token = f"token:{key_id}"
    rotated, _ = await audit.run(
        "token rotate", key_id, "--grace", "1h", action="token.rotate", resource=on_token
    )
    await audit.run(
        "token bind", key_id, "--cert", str(cert.cert), action="token.bind", resource=on_token
    )
    await audit.run("token bind", key_id, "--unbind", action="token.unbind", resource=on_token)
    await audit.run("token revoke", key_id, action="token.revoke", resource=on_token)
    return [created["token"].partition(".")[2], rotated["token"].partition(".")[2]]


@pytest.mark.timeout(300)
async def test_each_admin_action_writes_one_entry_and_no_secret_is_logged(
    relay: harness.Relay, agents: Any, tmp_path: pathlib.Path
) -> None:
    relay.start()
    await relay.wait_ready()
    audit = Audited(relay)
    files = tmp_path / "inputs"
    files.mkdir()
    (files / "password").write_text(BASIC_PASSWORD)
    (files / "signing").write_text(SIGNING_SECRET)

    async with harness.Target(respond=poison_target) as target:
        agent = agents(target.url)
        secrets = await exercise(audit, relay, files, target)
        agent.kill(signal.SIGTERM)
        wrong = relay.token.partition(".")[0] + ".wrong-secret-xyz"
        refused = agents(target.url, token=wrong, name="refused")
        assert await refused.wait_exit() == 3
    assert audit.ran == set(MUTATING)

    relay.stop()
    entries = audit.rows()
    on_agents = {(e["action"], e["result"]) for e in entries if e["action"].startswith("agent.")}
    assert on_agents == {
        ("agent.connect", "ok"),
        ("agent.disconnect", "ok"),
        ("agent.connect", "denied"),
    }
    texts = [relay.log_text(), agent.log_text(), refused.log_text(), *audit.stderr]
    texts += [json.dumps(entry) for entry in entries]
    for secret in [*secrets, relay.token.partition(".")[2], "wrong-secret-xyz"]:
        assert not [t for t in texts if secret in t], "a token secret was logged or audited"
    for secret in (BASIC_PASSWORD, SIGNING_SECRET, CANARY.decode(), "c4n4ry-b0dy-2f9e"):
        assert not [t for t in texts if secret in t], f"{secret!r} was logged or audited"
