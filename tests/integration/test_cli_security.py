"""`bucket auth` and `input verify` in-process on a real database: what they store."""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
from typing import Any

import bcrypt
from click.testing import CliRunner

from relay_server import cli, crypto, models
from relay_server.store import database, sql

PASSWORD = "a long enough password"
SECRETS = ["whsec_" + base64.b64encode(k * 24).decode() for k in (b"a", b"b")]


def run(home: pathlib.Path, url: str, *args: str) -> Any:
    options = ["--database-url", url, "--key-file", str(home / "key")]
    result = CliRunner().invoke(cli.main, [*options, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.stdout


def route_and_bucket(home: pathlib.Path, url: str, input_id: str) -> models.Route:
    async def read() -> models.Route:
        keyring = crypto.load_key_file(home / "key")
        store = sql.SqlStore(database.DatabaseSettings(url=url), keyring)
        await store.open()
        try:
            found = await store.route(input_id)
        finally:
            await store.close()
        assert found is not None
        return found

    return asyncio.run(read())


def test_bucket_auth_and_input_verify_store_what_they_say(
    tmp_path: pathlib.Path, database_url: str
) -> None:
    run(tmp_path, database_url, "keys", "generate", "--key-file", str(tmp_path / "key"))
    run(tmp_path, database_url, "account", "create", "default")
    run(tmp_path, database_url, "bucket", "create", "shop")
    input_id = run(tmp_path, database_url, "input", "create", "--bucket", "shop", "--json")["id"]
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    for i, secret in enumerate(SECRETS):
        (tmp_path / f"s{i}").write_text(secret)

    shown = run(tmp_path, database_url, "bucket", "auth", "shop", "--basic", "ops",
                "--password-file", str(tmp_path / "pw"), "--json")  # fmt: skip
    assert shown == {"bucket": "shop", "input_auth": {"kind": "basic", "username": "ops"}}
    run(tmp_path, database_url, "input", "verify", input_id, "--provider", "standard-webhooks",
        "--secret-file", str(tmp_path / "s0"), "--secret-file", str(tmp_path / "s1"),
        "--tolerance", "2m")  # fmt: skip
    route = route_and_bucket(tmp_path, database_url, input_id)
    auth = route.bucket.input_auth
    assert auth is not None and auth.username == "ops"
    assert bcrypt.checkpw(PASSWORD.encode(), auth.secret_hash.encode())
    assert route.input.verification == models.Verification(
        kind=models.VerifyKind.STANDARD, secrets=tuple(SECRETS), tolerance_s=120
    )
    assert "input auth: basic (user ops)" in run(tmp_path, database_url, "bucket", "show", "shop")

    run(tmp_path, database_url, "bucket", "auth", "shop", "--none")
    run(tmp_path, database_url, "input", "verify", input_id, "--off")
    route = route_and_bucket(tmp_path, database_url, input_id)
    assert (route.bucket.input_auth, route.input.verification) == (None, None)
