"""The agent command quickstart prints matches the server's transport."""

from __future__ import annotations

import pathlib

import pytest
from click.testing import CliRunner

from relay_server import cli


@pytest.mark.parametrize(("tls_cert", "insecure"), [("", True), ("/etc/tls/relay.pem", False)])
def test_the_printed_agent_command_uses_tls_when_the_server_does(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, tls_cert: str, insecure: bool
) -> None:
    if tls_cert:
        monkeypatch.setenv("STOWHOOK_GRPC_TLS_CERT", tls_cert)
    result = CliRunner().invoke(
        cli.main,
        [
            "--database-url",
            f"sqlite:///{tmp_path / 'relay.db'}",
            "--key-file",
            str(tmp_path / "relay.key"),
            "quickstart",
        ],
    )
    assert result.exit_code == 0, result.output
    (command,) = [line for line in result.output.splitlines() if " run --server " in line]
    assert ("--insecure" in command) is insecure, command
