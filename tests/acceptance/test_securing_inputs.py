"""Securing an input with the CLI, against a real relay-server process: bucket auth and a
provider signature, what `input list`/`bucket show`/`audit list` say, and no secret in
any output, log or database file."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from aiohttp import ClientSession

from tests.acceptance import harness


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with ClientSession() as session:
        async with session.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.text()


async def test_bucket_token_and_github_signature_from_the_cli(relay: harness.Relay) -> None:
    token, signing = f"tok_{secrets.token_hex(16)}", f"gh_{secrets.token_hex(16)}"
    (relay.home / "token").write_text(token + "\n")
    (relay.home / "signing").write_text(signing)
    said = await relay.cli(
        "bucket", "auth", "quickstart", "--token-file", str(relay.home / "token")
    )
    assert said.stdout == "bucket quickstart input auth: token\n"
    said = await relay.cli(
        "input", "verify", relay.input_id, "--provider", "github",
        "--secret-file", str(relay.home / "signing"),
    )  # fmt: skip
    assert said.stdout == f"input {relay.input_id} signatures: github, 1 secret\n"
    relay.start()
    await relay.wait_ready()

    body = b'{"action": "opened"}'
    signature = "sha256=" + hmac.new(signing.encode(), body, hashlib.sha256).hexdigest()
    bearer = {"Authorization": f"Bearer {token}"}
    assert await post(relay.input_url(), body, {"X-Hub-Signature-256": signature}) == (
        401,
        "missing or wrong credentials\n",
    )
    assert await post(relay.input_url(), body, bearer) == (401, "invalid signature\n")
    assert (await post(relay.input_url(), body, {**bearer, "X-Hub-Signature-256": signature}))[
        0
    ] == 200
    assert [e["size"] for e in await relay.cli_json("event", "list")] == [len(body)]

    listed = (await relay.cli("input", "list")).stdout
    assert listed.split("\n")[0].split()[-2:] == ["SIGNATURES", "URL"]
    assert listed.split("\n")[1].split()[-2:] == ["github", relay.input_url()]
    assert "input auth: token" in (await relay.cli("bucket", "show", "quickstart")).stdout
    entries = await relay.cli_json("audit", "list")
    assert {(e["action"], e["detail"]) for e in entries} >= {
        ("bucket.auth", "token"),
        ("input.verify", "github, 1 secret"),
    }
    shown = json.dumps(
        [
            entries,
            await relay.cli_json("bucket", "show", "quickstart"),
            await relay.cli_json("input", "list"),
        ]
    )
    relay.stop()
    for secret in (token, signing):
        assert secret not in shown and secret not in relay.log_text()
        for path in (relay.home / "var").iterdir():
            assert secret.encode() not in path.read_bytes(), path.name
    assert "$2b$" not in shown, "not even the password hash is printed"
