"""`bucket auth` and `input verify` refuse bad flags and secrets with a clear message,
before anything is stored."""

from __future__ import annotations

import pathlib

import pytest
from click.testing import CliRunner

from relay_server import cli

INPUT_ID = "01a2095a-0ed6-7221-85b9-15eb1e6ee3e5"


@pytest.fixture
def files(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "plain").write_text("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n")
    (tmp_path / "short").write_text("abc")
    (tmp_path / "empty").write_text("\n")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["input", "verify", INPUT_ID, "--provider", "standard-webhooks",
             "--secret-file", "plain"],
            "a Standard Webhooks secret is whsec_<base64>: it does not start with whsec_",
        ),
        (
            ["input", "verify", INPUT_ID, "--provider", "hmac", "--secret-file", "plain"],
            "--provider hmac needs --header NAME",
        ),
        (
            ["input", "verify", INPUT_ID, "--provider", "github", "--secret-file", "plain",
             "--tolerance", "1m"],
            "github signatures carry no timestamp: drop --tolerance",
        ),
        (
            ["input", "verify", INPUT_ID, "--provider", "stripe", "--secret-file", "plain",
             "--tolerance", "2h"],
            "--tolerance must be between 1s and 1h",
        ),
        (
            ["input", "verify", INPUT_ID, "--provider", "github", "--secret-file", "missing"],
            "cannot read missing",
        ),
        (["input", "verify", INPUT_ID, "--provider", "github"], "at least one --secret-file"),
        (["input", "verify", INPUT_ID, "--off", "--provider", "github"], "--off takes no other"),
        (["bucket", "auth", "b", "--token-file", "short"], "at least 12 characters"),
        (["bucket", "auth", "b", "--token-file", "empty"], "the token is empty"),
        (["bucket", "auth", "b", "--basic", "shop"], "--basic USERNAME needs --password-file"),
        (["bucket", "auth", "b", "--basic", "a:b", "--password-file", "plain"], "has no ':'"),
        (["bucket", "auth", "b", "--none", "--token-file", "plain"], "give exactly one of"),
        (["bucket", "auth", "b", "--token-file", "plain", "--password-file", "x"], "goes with"),
    ],
)  # fmt: skip
def test_bad_flags_and_secrets_are_named(
    files: pathlib.Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(files)
    database = ["--database-url", f"sqlite:///{files / 'never.db'}"]
    result = CliRunner().invoke(cli.main, [*database, *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not (files / "never.db").exists(), "refused before the database is touched"
