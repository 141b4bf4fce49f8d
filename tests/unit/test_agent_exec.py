"""The exec destination: pure helpers, then real processes (small Python scripts)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import sys
import textwrap
import time

import pytest

from relay_agent import errors, models, settings
from relay_agent.destinations import exec as exec_destination

RECEIVED = datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=datetime.UTC)


def make_delivery(**changes: object) -> models.Delivery:
    values: dict[str, object] = {
        "lease_id": "d1.3",
        "event_id": "01a2b3c4-0000-7000-8000-000000000001",
        "bucket": "github",
        "input_id": "in-1",
        "method": "POST",
        "path": "/push",
        "query": "a=1&b=%20",
        "headers": (("Content-Type", "application/json"), ("X-Dup", "1"), ("x-dup", "2")),
        "body": b'{"hello": 1}',
        "received_at": RECEIVED,
        "attempt": 3,
        "lease_deadline": RECEIVED,
        "output": "default",
        "replay": False,
    }
    values.update(changes)
    return models.Delivery(**values)  # type: ignore[arg-type]


# ---- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Content-Type", "CONTENT_TYPE"),
        ("x-github-event", "X_GITHUB_EVENT"),
        ("X.Weird Name!", "X_WEIRD_NAME_"),
        ("stripe-signature", "STRIPE_SIGNATURE"),
        ("ünïcode", "_N_CODE"),
    ],
)
def test_header_env_name(name: str, expected: str) -> None:
    assert exec_destination.header_env_name(name) == expected


def test_repeated_headers_are_joined_in_order() -> None:
    variables = exec_destination.header_variables(
        (("X-Dup", "first"), ("Accept", "*/*"), ("x-dup", "second"), ("X_Dup", "third"))
    )
    assert variables == {
        "STOWHOOK_HEADER_X_DUP": "first, second, third",
        "STOWHOOK_HEADER_ACCEPT": "*/*",
    }


def test_child_environment_drops_the_agents_own_stowhook_variables() -> None:
    environ = {"PATH": "/usr/bin", "STOWHOOK_TOKEN": "key.secret", "STOWHOOK_SERVER": "x:1"}
    env = exec_destination.child_environment(
        environ, make_delivery(replay=True), pathlib.Path("/tmp/x/retry-after")
    )
    assert env["PATH"] == "/usr/bin"
    assert "STOWHOOK_TOKEN" not in env and "STOWHOOK_SERVER" not in env
    assert "key.secret" not in env.values()
    assert env["STOWHOOK_EVENT_ID"] == "01a2b3c4-0000-7000-8000-000000000001"
    assert env["STOWHOOK_RECEIVED_AT"] == "2024-05-01T12:00:00.123456Z"
    assert env["STOWHOOK_ATTEMPT"] == "3"
    assert env["STOWHOOK_REPLAY"] == "1"
    assert env["STOWHOOK_QUERY"] == "a=1&b=%20"
    assert env["STOWHOOK_BODY_SIZE"] == "12"
    assert env["STOWHOOK_HEADER_X_DUP"] == "1, 2"
    assert env["STOWHOOK_RETRY_AFTER_FILE"] == "/tmp/x/retry-after"


def test_received_at_in_another_zone_is_given_in_utc() -> None:
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    moment = datetime.datetime(2024, 5, 1, 14, 0, 0, tzinfo=plus_two)
    assert exec_destination.iso_utc(moment) == "2024-05-01T12:00:00.000000Z"


@pytest.mark.parametrize(
    ("raw", "expected_ms"),
    [
        (b"30\n", 30_000),
        (b" 2.5 ", 2_500),
        (b"0", 0),
        (b"99999999", 3_600_000),
        (b"-1", None),
        (b"soon", None),
        (b"nan", None),
        (b"inf", None),
        (b"\xff", None),
        (b"", None),
    ],
)
def test_parse_retry_after(raw: bytes, expected_ms: int | None) -> None:
    assert exec_destination.parse_retry_after(raw) == expected_ms


@pytest.mark.parametrize(
    ("finished", "expected"),
    [
        (exec_destination.Result(returncode=0), models.Ack()),
        (exec_destination.Result(returncode=1), models.Nack(reason="exit status 1")),
        (
            exec_destination.Result(returncode=75),
            models.Nack(retry_after_ms=2000, reason="exit status 75 (try again later)"),
        ),
        (exec_destination.Result(returncode=-9), models.Nack(reason="killed by SIGKILL")),
        (
            exec_destination.Result(returncode=-15, timed_out=True),
            models.Nack(reason="timed out after 1s: process group killed"),
        ),
    ],
)
def test_outcome(finished: exec_destination.Result, expected: models.Outcome) -> None:
    assert exec_destination.outcome(finished, 2000, 1.0) == expected


def test_exec_argv_splits_without_a_shell_unless_asked() -> None:
    assert settings.exec_argv("/bin/handle --flag 'two words'", shell=False) == (
        "/bin/handle",
        "--flag",
        "two words",
    )
    assert settings.exec_argv("cat | wc -c", shell=True) == ("/bin/sh", "-c", "cat | wc -c")
    with pytest.raises(errors.ConfigError, match="--shell"):
        settings.exec_argv("echo 'unclosed", shell=False)
    with pytest.raises(errors.ConfigError, match="empty"):
        settings.exec_argv("   ", shell=False)


def test_program_problem(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "handler"
    script.write_text("#!/bin/sh\n")
    assert "not executable" in str(exec_destination.program_problem(str(script), None))
    script.chmod(0o755)
    assert exec_destination.program_problem(str(script), None) is None
    assert "does not exist" in str(exec_destination.program_problem(str(tmp_path / "no"), None))
    assert exec_destination.program_problem("handler", str(tmp_path)) is None
    assert "not in PATH" in str(exec_destination.program_problem("handler", "/nonexistent"))


# ---- real processes -------------------------------------------------------------------


def python_script(tmp_path: pathlib.Path, code: str) -> tuple[str, ...]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(code))
    return (sys.executable, str(path))


def destination(
    argv: tuple[str, ...], timeout_s: float = 10.0, kill_grace_s: float = 0.5, **environ: str
) -> exec_destination.ExecDestination:
    return exec_destination.ExecDestination(
        settings.ExecDestinationSettings(
            argv=argv, timeout_s=timeout_s, kill_grace_s=kill_grace_s, output_limit_bytes=64
        ),
        {"PATH": os.environ.get("PATH", ""), **environ},
    )


async def test_the_script_gets_the_body_on_stdin_and_the_metadata_in_its_environment(
    tmp_path: pathlib.Path,
) -> None:
    out = tmp_path / "seen.json"
    argv = python_script(
        tmp_path,
        f"""
        import json, os, sys
        body = sys.stdin.buffer.read()
        env = {{k: v for k, v in os.environ.items() if k.startswith("STOWHOOK_")}}
        with open({str(out)!r}, "w") as f:
            json.dump({{"body": body.hex(), "env": env}}, f)
        """,
    )
    body = bytes(range(256)) * 1000  # larger than a pipe buffer, not UTF-8
    outcome = await destination(argv, STOWHOOK_TOKEN="key.secret").deliver(make_delivery(body=body))
    assert outcome == models.Ack()
    seen = json.loads(out.read_text())
    assert bytes.fromhex(seen["body"]) == body
    env = seen["env"]
    assert "STOWHOOK_TOKEN" not in env
    assert env["STOWHOOK_METHOD"] == "POST" and env["STOWHOOK_PATH"] == "/push"
    assert env["STOWHOOK_LEASE_ID"] == "d1.3" and env["STOWHOOK_BUCKET"] == "github"
    assert env["STOWHOOK_HEADER_CONTENT_TYPE"] == "application/json"
    assert not pathlib.Path(env["STOWHOOK_RETRY_AFTER_FILE"]).parent.exists(), "cleaned up"


async def test_exit_codes(tmp_path: pathlib.Path) -> None:
    argv = python_script(
        tmp_path,
        """
        import os, sys
        code = int(sys.stdin.read())
        if code == 75:
            with open(os.environ["STOWHOOK_RETRY_AFTER_FILE"], "w") as f:
                f.write("12.5\\n")
        sys.exit(code)
        """,
    )
    target = destination(argv)
    assert await target.deliver(make_delivery(body=b"0")) == models.Ack()
    assert await target.deliver(make_delivery(body=b"3")) == models.Nack(reason="exit status 3")
    assert await target.deliver(make_delivery(body=b"75")) == models.Nack(
        retry_after_ms=12_500, reason="exit status 75 (try again later)"
    )


async def test_exit_75_without_a_delay_uses_the_backoff(tmp_path: pathlib.Path) -> None:
    argv = python_script(tmp_path, "import sys; sys.exit(75)")
    outcome = await destination(argv).deliver(make_delivery())
    assert outcome == models.Nack(retry_after_ms=None, reason="exit status 75 (try again later)")


async def test_a_script_that_does_not_read_stdin_is_fine(tmp_path: pathlib.Path) -> None:
    argv = python_script(tmp_path, "pass")
    outcome = await destination(argv).deliver(make_delivery(body=b"x" * 5_000_000))
    assert outcome == models.Ack()


async def test_a_missing_program_is_a_nack(tmp_path: pathlib.Path) -> None:
    outcome = await destination((str(tmp_path / "missing"),)).deliver(make_delivery())
    assert outcome == models.Nack(reason="cannot start the command: No such file or directory")


async def test_a_hanging_script_and_its_children_are_killed_at_the_timeout(
    tmp_path: pathlib.Path,
) -> None:
    pids = tmp_path / "pids"
    argv = python_script(
        tmp_path,
        f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL will do
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open({str(pids)!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}} {{os.getpgrp()}}")
        time.sleep(60)
        """,
    )
    started = time.monotonic()
    outcome = await destination(argv, timeout_s=1.0, kill_grace_s=0.3).deliver(make_delivery())
    elapsed = time.monotonic() - started
    assert outcome == models.Nack(reason="timed out after 1s: process group killed")
    assert 1.0 <= elapsed < 5.0
    leader, child, group = (int(n) for n in pids.read_text().split())
    assert group == leader, "the script leads its own process group"
    for _ in range(100):
        if not alive(child):
            break
        await asyncio.sleep(0.05)
    assert not alive(child), "the script's child was killed with it"


async def test_cancelling_a_delivery_kills_the_script(tmp_path: pathlib.Path) -> None:
    pid_file = tmp_path / "pid"
    argv = python_script(
        tmp_path,
        f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
        """,
    )
    task = asyncio.create_task(destination(argv).deliver(make_delivery()))
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(pid_file.read_text())
    for _ in range(100):
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid)


async def test_output_is_logged_truncated_and_never_the_body(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import structlog

    argv = python_script(
        tmp_path,
        """
        import sys
        sys.stdout.write("a" * 1000 + "END-OF-STDOUT")
        sys.stderr.write("oops")
        sys.exit(2)
        """,
    )
    with structlog.testing.capture_logs() as logs:
        outcome = await destination(argv).deliver(make_delivery(body=b"TOP-SECRET-BODY"))
    assert outcome == models.Nack(reason="exit status 2")
    [entry] = [entry for entry in logs if entry["event"] == "script_output"]
    assert entry["stdout"].endswith("END-OF-STDOUT") and len(entry["stdout"]) == 64
    assert entry["stdout_truncated"] is True
    assert entry["stderr"] == "oops" and entry["stderr_truncated"] is False
    assert entry["exit_status"] == 2
    assert "TOP-SECRET-BODY" not in repr(logs)


async def test_a_script_leaving_a_child_that_holds_stdout_does_not_hold_up_the_ack(
    tmp_path: pathlib.Path,
) -> None:
    argv = python_script(
        tmp_path,
        """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
        print("started a helper")
        """,
    )
    started = time.monotonic()
    assert await destination(argv).deliver(make_delivery()) == models.Ack()
    assert time.monotonic() - started < 2.5


async def test_a_shell_command(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    argv = settings.exec_argv(f'wc -c > {out} && test "$STOWHOOK_ATTEMPT" = 3', shell=True)
    outcome = await destination(argv).deliver(make_delivery(body=b"12345"))
    assert outcome == models.Ack()
    assert out.read_text().strip() == "5"


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 here may not reap)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_a_script_that_exits_before_reading_a_large_body_is_judged_by_its_status(
    tmp_path: pathlib.Path,
) -> None:
    argv = python_script(tmp_path, "import sys; sys.stdin.buffer.read(10); sys.exit(3)")
    outcome = await destination(argv).deliver(make_delivery(body=b"x" * 5_000_000))
    assert outcome == models.Nack(reason="exit status 3")


async def test_a_timed_out_script_that_obeys_sigterm_is_reported_as_such(
    tmp_path: pathlib.Path,
) -> None:
    argv = python_script(tmp_path, "import time; time.sleep(60)")
    started = time.monotonic()
    outcome = await destination(argv, timeout_s=0.5, kill_grace_s=5.0).deliver(make_delivery())
    assert outcome == models.Nack(reason="timed out after 0.5s: process group killed")
    assert time.monotonic() - started < 3.0, "no need to wait out the grace"


async def test_the_run_result_keeps_tails_and_the_signal(tmp_path: pathlib.Path) -> None:
    argv = python_script(
        tmp_path,
        """
        import os, signal, sys
        sys.stdout.write("x" * 100_000 + "tail")
        sys.stdout.flush()
        sys.stderr.write("err")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    result = await exec_destination.run_process(
        argv, env=dict(os.environ), stdin=b"", timeout_s=10, kill_grace_s=1, output_limit=10
    )
    assert result == exec_destination.Result(
        returncode=-9, stdout=b"xxxxxxtail", stderr=b"err", stdout_truncated=True
    )


def test_the_retry_after_file_must_be_a_small_regular_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "retry-after"
    assert exec_destination.read_retry_after(path) is None  # absent
    path.write_text("7")
    assert exec_destination.read_retry_after(path) == 7000
    path.write_text("1" * 100)
    assert exec_destination.read_retry_after(path) is None
    path.unlink()
    os.mkfifo(path)  # would block a plain open() for ever
    assert exec_destination.read_retry_after(path) is None
    path.unlink()
    (tmp_path / "elsewhere").write_text("5")
    path.symlink_to(tmp_path / "elsewhere")
    assert exec_destination.read_retry_after(path) is None
