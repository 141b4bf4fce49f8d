"""The relay-agent command line: options, configuration errors and exit codes."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from click.testing import CliRunner

import relay_agent
from relay_agent import cli, errors
from relay_agent import logging as agent_logging

BASE = ["run", "--server", "127.0.0.1:1", "--insecure", "--bucket", "b"]
BASE += ["--forward", "http://127.0.0.1:9/"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_version() -> None:
    code, output = invoke("--version")
    assert code == 0
    assert relay_agent.__version__ in output


def test_exported_members() -> None:
    assert "__version__" in relay_agent.__all__  # the SDK's surface: test_agent_consumer.py


def test_help_lists_the_options() -> None:
    code, output = invoke("run", "--help")
    assert code == 0
    for option in ("--server", "--token-file", "--bucket", "--forward", "--max-in-flight"):
        assert option in output
    assert "STOWHOOK_SERVER" in output


def test_no_token_is_a_config_error() -> None:
    code, output = invoke(*BASE)
    assert code == 2
    assert "error: no agent token" in output


def test_token_and_token_file_together_are_refused(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("k.s\n")
    code, output = invoke(*BASE, "--token", "k.s", "--token-file", str(token_file))
    assert code == 2
    assert "not both" in output


def test_malformed_token_does_not_echo_it() -> None:
    code, output = invoke(*BASE, "--token", "hunter2-without-a-dot")
    assert code == 2
    assert "<key_id>.<secret>" in output
    assert "hunter2" not in output


def test_blank_token_file_is_refused(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  \n")
    code, output = invoke(*BASE, "--token-file", str(token_file))
    assert code == 2
    assert "empty" in output


def test_token_file_whitespace_is_stripped(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n  key1.secret \n")
    assert cli._token(None, token_file) == "key1.secret"


def test_missing_required_option_is_a_usage_error() -> None:
    code, output = invoke("run", "--token", "k.s")
    assert code == 2
    assert "--server" in output


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            errors.TokenRefused("refused", key_id="key7"),
            3,
            "the server refused the token (key id key7): check --token / STOWHOOK_TOKEN",
        ),
        (
            errors.BucketRefused("bucket 'x' is not in scope", bucket="x"),
            4,
            "bucket 'x' is not in scope",
        ),
        (errors.ConfigError("bad"), 2, "bad"),
        (errors.FatalError("the server rejected a frame"), 1, "the server rejected a frame"),
    ],
)
def test_exit_codes(error: errors.AgentError, code: int, message: str) -> None:
    assert cli._exit_for(error) == (code, message)


def test_json_logs_are_one_object_per_line_without_secrets() -> None:
    out = io.StringIO()
    agent_logging.configure("auto", "info", stream=out)  # not a TTY: JSON
    log = structlog.get_logger("test")
    log.info("connected", session_id="s1", token="key.secret", body=b"payload")
    log.debug("hidden")
    logging.getLogger("aiohttp.client").warning("from the stdlib")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["connected", "from the stdlib"]
    assert lines[0]["session_id"] == "s1"
    assert lines[0]["token"] == "[redacted]" and lines[0]["body"] == "[redacted]"
    assert "secret" not in out.getvalue()
