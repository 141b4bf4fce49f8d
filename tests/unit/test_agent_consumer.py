"""The SDK's pure parts, `pull`'s output (JSON lines, pipe hand-off) and its options."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import io
import json
import os
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

import relay_agent
from relay_agent import cli, cli_pull, consumer, models

RECEIVED = datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=datetime.UTC)


def delivery(body: bytes = b'{"a": 1}', **fields: object) -> models.Delivery:
    values: dict[str, object] = {
        "lease_id": "d1.3",
        "event_id": "e1",
        "bucket": "github",
        "input_id": "in-1",
        "method": "POST",
        "path": "/push",
        "query": "a=1&a=2",
        "headers": (("X-Dup", "1"), ("X-Dup", "2")),
        "body": body,
        "received_at": RECEIVED,
        "attempt": 3,
        "lease_deadline": RECEIVED,
        "output": "default",
        "replay": True,
    }
    return models.Delivery(**(values | fields))  # type: ignore[arg-type]


def test_exported_members() -> None:
    assert set(relay_agent.__all__) == {
        *("Consumer", "Event", "AgentSettings", "ReconnectPolicy", "__version__"),
        *("AgentError", "FatalError", "TokenRefused", "BucketRefused", "ConfigError"),
        *("ConnectionLost", "SettlementError", "LeaseLost", "AlreadySettled"),
    }
    for name in relay_agent.__all__:
        assert hasattr(relay_agent, name), name
    assert relay_agent.Consumer is consumer.Consumer
    assert issubclass(relay_agent.LeaseLost, relay_agent.SettlementError)
    assert issubclass(relay_agent.AlreadySettled, relay_agent.AgentError)


@pytest.mark.parametrize(
    ("seconds", "ms"), [(None, None), (0, 0), (0.0004, 0), (0.001, 1), (2.5, 2500), (60, 60_000)]
)
def test_retry_after_in_milliseconds(seconds: float | None, ms: int | None) -> None:
    assert consumer.retry_after_ms(seconds) == ms


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf")])
def test_nonsense_retry_after_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        consumer.retry_after_ms(seconds)


@pytest.mark.parametrize(("seconds", "ms"), [(None, 30_000), (0.0001, 1), (2, 2000)])
def test_extend_in_milliseconds(seconds: float | None, ms: int) -> None:
    assert consumer.extend_ms(seconds, 30_000) == ms


@pytest.mark.parametrize("seconds", [0, -1, float("nan")])
def test_nonsense_extensions_are_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="extend"):
        consumer.extend_ms(seconds, 30_000)


def test_heartbeats_coalesce_into_one_frame_per_length() -> None:
    held = [("a.1", 30_000), ("b.1", 30_000), ("c.1", 120_000), ("d.1", 30_000)]
    assert consumer.heartbeat_frames(held) == {30_000: ["a.1", "b.1", "d.1"], 120_000: ["c.1"]}
    assert consumer.heartbeat_frames([]) == {}


@pytest.mark.parametrize(
    ("max_events", "dry_run", "expected"),
    [(None, False, 16), (5, False, 5), (100, False, 16), (None, True, 1000), (5, True, 5)],
)
def test_pull_leases_no_more_than_it_may_print(
    max_events: int | None, dry_run: bool, expected: int
) -> None:
    assert cli_pull.in_flight(max_events, dry_run=dry_run) == expected


def test_an_event_line_has_every_field_and_a_text_body() -> None:
    line = cli_pull.event_line(delivery(body='{"name": "J\u00fcrgen"}'.encode()))
    assert b"\n" not in line
    assert json.loads(line) == {
        "id": "e1",
        "bucket": "github",
        "input_id": "in-1",
        "method": "POST",
        "path": "/push",
        "query": "a=1&a=2",
        "headers": [["X-Dup", "1"], ["X-Dup", "2"]],
        "body": '{"name": "J\u00fcrgen"}',
        "received_at": "2024-05-01T12:00:00.123456+00:00",
        "attempt": 3,
        "replay": True,
        "lease_id": "d1.3",
    }


def test_a_body_that_is_not_utf8_is_base64() -> None:
    record = json.loads(cli_pull.event_line(delivery(body=b"\xff\x00\n")))
    assert "body" not in record
    assert base64.b64decode(record["body_base64"]) == b"\xff\x00\n"


def test_a_text_body_with_newlines_stays_on_one_line() -> None:
    line = cli_pull.event_line(delivery(body=b"one\ntwo\r\n"))
    assert b"\n" not in line and json.loads(line)["body"] == "one\ntwo\r\n"


# ---- the pipe hand-off: a line counts once the reader has read it ------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, io.BufferedWriter]]:
    read_fd, write_fd = os.pipe()
    writer = os.fdopen(write_fd, "wb")
    try:
        yield read_fd, writer
    finally:
        with contextlib.suppress(BrokenPipeError):
            writer.close()  # closes the descriptor even when the last flush fails
        with contextlib.suppress(OSError):
            os.close(read_fd)  # unless the test closed it


async def test_a_line_in_a_pipe_counts_once_the_reader_has_read_it(pipe) -> None:
    read_fd, writer = pipe
    output = cli_pull.LineWriter(writer)
    writing = asyncio.ensure_future(output.write_line(b'{"n": 1}', asyncio.Event()))
    await asyncio.sleep(0.1)
    assert not writing.done()  # written, flushed, but still in the pipe
    assert os.read(read_fd, 100) == b'{"n": 1}\n'
    assert await asyncio.wait_for(writing, 2) is True
    assert not output.closed


async def test_a_line_left_in_the_pipe_by_a_reader_that_exits_does_not_count(pipe) -> None:
    read_fd, writer = pipe
    output = cli_pull.LineWriter(writer)
    writing = asyncio.ensure_future(output.write_line(b"unread", asyncio.Event()))
    await asyncio.sleep(0.05)
    os.close(read_fd)
    assert await asyncio.wait_for(writing, 2) is False
    assert output.closed
    assert await output.write_line(b"next", asyncio.Event()) is False


async def test_a_closed_pipe_is_a_reader_gone_not_an_error(pipe) -> None:
    read_fd, writer = pipe
    os.close(read_fd)
    output = cli_pull.LineWriter(writer)
    assert await output.write_line(b"line", asyncio.Event()) is False
    assert output.closed


async def test_an_interruption_gives_up_waiting_for_the_reader(pipe) -> None:
    _, writer = pipe
    interrupted = asyncio.Event()
    output = cli_pull.LineWriter(writer)
    writing = asyncio.ensure_future(output.write_line(b"line", interrupted))
    await asyncio.sleep(0.05)
    interrupted.set()
    assert await asyncio.wait_for(writing, 2) is False
    assert not output.closed


async def test_a_file_or_terminal_counts_once_flushed() -> None:
    buffer = io.BytesIO()
    output = cli_pull.LineWriter(buffer)  # type: ignore[arg-type]
    assert await output.write_line(b"a", asyncio.Event()) is True
    assert buffer.getvalue() == b"a\n"


# ---- the command line ------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, ["pull", *args])
    return result.exit_code, result.stdout, result.stderr


def test_pull_help_lists_its_options_and_the_shared_ones() -> None:
    code, out, _ = invoke("--help")
    assert code == 0
    for option in ("--server", "--token-file", "--bucket", "--max", "--wait", "--no-ack"):
        assert option in out
    assert "--nack-on-exit" in out and "STOWHOOK_SERVER" in out
    assert "--forward" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bucket", "b", "--token", "k.s"], "--server HOST:PORT is required"),
        (["--server", "127.0.0.1:1", "--token", "k.s"], "--bucket NAME is required"),
        (["--server", "127.0.0.1:1", "--bucket", "b"], "no agent token"),
        (["--server", "nonsense", "--bucket", "b", "--token", "k.s"], "invalid server address"),
    ],
)
def test_pull_configuration_errors_exit_2(args: list[str], message: str) -> None:
    code, out, err = invoke(*args)
    assert code == 2
    assert message in err and out == ""


def test_pull_exits_1_when_the_server_cannot_be_reached() -> None:
    code, out, err = invoke(
        *("--server", "127.0.0.1:1", "--insecure", "--bucket", "b", "--token", "k.s"),
        *("--connect-timeout", "0.3"),
    )
    assert code == 1
    assert "could not connect to 127.0.0.1:1 within 0.3s" in err
    assert out == ""


def test_run_keeps_its_own_log_level_default() -> None:
    run_level = next(p for p in cli.main.commands["run"].params if p.name == "log_level")
    pull_level = next(p for p in cli.main.commands["pull"].params if p.name == "log_level")
    assert (run_level.default, pull_level.default) == ("info", "warning")
