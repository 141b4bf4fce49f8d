"""exec and dir destinations and the agent's config file, with real processes."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import signal
import stat
import sys
import textwrap
import time

import multidict
import yarl
from aiohttp import ClientSession

from tests.acceptance import harness


async def post(url: str, body: bytes = b"{}", headers: object = None) -> int:
    async with ClientSession() as session:
        async with session.post(yarl.URL(url, encoded=True), data=body, headers=headers) as resp:
            await resp.read()
            return resp.status


def agent_args(relay: harness.Relay, *destination: str, name: str = "agent") -> list[str]:
    return [
        "run",
        "--server",
        relay.grpc_address,
        "--insecure",
        "--bucket",
        "quickstart",
        "--log-format",
        "json",
        "--name",
        name,
        *destination,
    ]


def write_script(path: pathlib.Path, code: str) -> pathlib.Path:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(code))
    path.chmod(0o755)
    return path


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of a group that still run (zombies do not count: PID 1 may not reap)."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


async def attempts_of(relay: harness.Relay, count: int, timeout: float = 20) -> list[dict]:
    """The attempts of the only event, once it has at least `count` settled ones."""
    shown: dict = {}

    async def settled() -> bool:
        nonlocal shown
        [event] = await relay.cli_json("event", "list")
        shown = await relay.cli_json("event", "show", str(event["id"]))
        return len([a for a in shown["attempts"] if a["outcome"]]) >= count

    deadline = time.monotonic() + timeout
    while not await settled():
        assert time.monotonic() < deadline, f"timed out waiting for {count} attempts: {shown}"
        await asyncio.sleep(0.1)
    return list(shown["attempts"])


# ---- exec -----------------------------------------------------------------------------

COUNTER_SCRIPT = """
import os, pathlib, sys, time
state = pathlib.Path(sys.argv[1])
runs = sorted(state.glob("run-*"))
n = len(runs) + 1
(state / f"run-{n}").write_text(f"{time.monotonic()} {os.environ['STOWHOOK_ATTEMPT']}")
if n == 1:
    sys.exit(1)
if n == 2:
    pathlib.Path(os.environ["STOWHOOK_RETRY_AFTER_FILE"]).write_text("2\\n")
    print("asked for 2s")
    sys.exit(75)
sys.exit(0)
"""


async def test_exit_1_is_retried_exit_75_waits_for_the_scripts_delay_exit_0_acks(
    relay: harness.Relay, run_agent, tmp_path: pathlib.Path
) -> None:
    relay.start("--retry-cap", "10s")  # a NACK's delay is honoured up to the backoff cap
    await relay.wait_ready()
    state = tmp_path / "state"
    state.mkdir()
    script = write_script(tmp_path / "handler.py", COUNTER_SCRIPT)
    run_agent(*agent_args(relay, "--exec", f"{script} {state}"))
    assert await post(relay.input_url(), b"counted") == 200
    await harness.wait_until(lambda: (state / "run-3").exists(), 20, "the third run")

    attempts = await attempts_of(relay, 3)
    assert [(a["outcome"], a["error"]) for a in attempts] == [
        ("nack", "exit status 1"),
        ("nack", "exit status 75 (try again later)"),
        ("ack", None),
    ]
    runs = [(state / f"run-{n}").read_text().split() for n in (1, 2, 3)]
    times = [float(at) for at, _ in runs]
    assert [attempt for _, attempt in runs] == ["1", "2", "3"]
    assert times[1] - times[0] < 1.5, "exit 1: the bucket's (fast) backoff"
    assert times[2] - times[1] >= 1.9, "exit 75: the 2 s the script asked for"
    assert not (state / "run-4").exists()


ENV_SCRIPT = """
import json, os, pathlib, sys
out = pathlib.Path(sys.argv[1])
(out / "body").write_bytes(sys.stdin.buffer.read())
env = {k: v for k, v in os.environ.items() if k.startswith("STOWHOOK_")}
(out / "env.json").write_text(json.dumps(env))
"""


async def test_the_script_gets_the_body_byte_for_byte_and_every_metadata_variable(
    running: harness.Relay, run_agent, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = write_script(tmp_path / "record.py", ENV_SCRIPT)
    run_agent(*agent_args(running, "--exec", f"{script} {out}"))
    body = bytes(range(256)) * 300 + b"\x00\xff"
    headers = multidict.CIMultiDict(
        [("Content-Type", "application/octet-stream"), ("X-Dup", "first"), ("X-Dup", "second")]
    )
    before = datetime.datetime.now(datetime.UTC)
    url = running.input_url(tail="/github/push") + "?a=1&b=%20x"
    assert await post(url, body, headers) == 200
    await harness.wait_until(lambda: (out / "env.json").exists(), 20, "the script to run")
    await asyncio.sleep(0.2)  # let it finish writing

    assert (out / "body").read_bytes() == body
    env = json.loads((out / "env.json").read_text())
    [event] = await running.cli_json("event", "list")
    assert env["STOWHOOK_EVENT_ID"] == str(event["id"])
    assert env["STOWHOOK_BUCKET"] == "quickstart"
    assert env["STOWHOOK_OUTPUT"] == "default"
    assert env["STOWHOOK_INPUT_ID"] == running.input_id
    assert env["STOWHOOK_METHOD"] == "POST"
    assert env["STOWHOOK_PATH"] == "/github/push"
    assert env["STOWHOOK_QUERY"] == "a=1&b=%20x"
    assert env["STOWHOOK_ATTEMPT"] == "1"
    assert env["STOWHOOK_REPLAY"] == "0"
    assert env["STOWHOOK_BODY_SIZE"] == str(len(body))
    assert env["STOWHOOK_LEASE_ID"].endswith(".1")
    received = datetime.datetime.fromisoformat(env["STOWHOOK_RECEIVED_AT"])
    assert env["STOWHOOK_RECEIVED_AT"].endswith("Z")
    assert before - datetime.timedelta(seconds=1) <= received <= before + datetime.timedelta(10)
    assert env["STOWHOOK_HEADER_CONTENT_TYPE"] == "application/octet-stream"
    assert env["STOWHOOK_HEADER_X_DUP"] == "first, second"
    assert env["STOWHOOK_RETRY_AFTER_FILE"].endswith("/retry-after")
    assert "STOWHOOK_TOKEN" not in env, "the agent's token never reaches a script"
    assert running.token not in json.dumps(env)


HANGING_SCRIPT = """
import os, pathlib, subprocess, sys, time
if os.environ["STOWHOOK_ATTEMPT"] != "1":
    sys.exit(0)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
pathlib.Path(sys.argv[1]).write_text(f"{os.getpgrp()} {child.pid}")
time.sleep(120)
"""


async def test_a_hanging_script_is_killed_with_its_process_group_and_nacked(
    running: harness.Relay, run_agent, tmp_path: pathlib.Path
) -> None:
    pids = tmp_path / "pids"
    script = write_script(tmp_path / "hang.py", HANGING_SCRIPT)
    agent = run_agent(*agent_args(running, "--exec", f"{script} {pids}", "--timeout", "1"))
    assert await post(running.input_url(), b"hang") == 200
    await harness.wait_until(lambda: pids.exists() and pids.read_text(), 20, "the script")
    pgid, child = (int(n) for n in pids.read_text().split())
    assert live_processes_in_group(pgid), "the script runs in its own process group"
    await harness.wait_until(
        lambda: "delivery_acked" in agent.log_text(), 20, "the second attempt to be acked"
    )

    attempts = await attempts_of(running, 2)
    assert attempts[0]["outcome"] == "nack"
    assert attempts[0]["error"] == "timed out after 1s: process group killed"
    assert attempts[1]["outcome"] == "ack"
    await harness.wait_until(
        lambda: not live_processes_in_group(pgid), 5, "the process group to be gone"
    )
    assert child not in live_processes_in_group(pgid)
    assert "script_timed_out" in agent.log_text()


# ---- dir ------------------------------------------------------------------------------


def final_files(spool: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in spool.iterdir() if not p.name.startswith("."))


async def test_200_events_become_200_complete_files_in_receive_order(
    running: harness.Relay, run_agent, tmp_path: pathlib.Path
) -> None:
    for n in range(200):  # one after the other: the receive order is n's order
        assert await post(running.input_url(), json.dumps({"n": n}).encode()) == 200
    spool = tmp_path / "spool"
    run_agent(*agent_args(running, "--dir", str(spool), "--max-in-flight", "32"))
    await harness.wait_until(lambda: spool.exists() and len(final_files(spool)) >= 200, 30, "files")
    await asyncio.sleep(0.3)  # anything beyond 200 would be a duplicate

    files = final_files(spool)
    assert len(files) == 200
    documents = [json.loads(path.read_text()) for path in files]
    assert [json.loads(d["body"])["n"] for d in documents] == list(range(200))
    assert len({d["event_id"] for d in documents}) == 200
    assert all(
        p.name.endswith(f"-{d['event_id']}.json") for p, d in zip(files, documents, strict=True)
    )
    assert [p.name for p in spool.iterdir() if p.name.startswith(".")] == []
    delivered = await running.cli_json("event", "list", "--state", "delivered", "--limit", "500")
    assert len(delivered) == 200


async def test_sigkill_during_a_burst_leaves_no_partial_file_and_loses_nothing(
    running: harness.Relay, run_agent, tmp_path: pathlib.Path
) -> None:
    padding = "x" * 50_000  # big enough that some writes are cut short by the kill

    async def send(n: int) -> int:
        return await post(running.input_url(), json.dumps({"n": n, "pad": padding}).encode())

    for batch in range(0, 300, 50):
        assert await asyncio.gather(*(send(n) for n in range(batch, batch + 50))) == [200] * 50
    spool = tmp_path / "spool"
    args = agent_args(running, "--dir", str(spool), "--max-in-flight", "64")
    first = run_agent(*args, name="first")
    await harness.wait_until(lambda: spool.exists() and len(final_files(spool)) >= 40, 30, "files")
    assert first.kill() == -signal.SIGKILL

    def check_complete() -> set[int]:
        seen: dict[int, str] = {}
        for path in final_files(spool):
            document = json.loads(path.read_text())  # a partial file would not parse
            payload = json.loads(document["body"])
            assert payload["pad"] == padding and document["body_size"] == len(document["body"])
            assert payload["n"] not in seen, f"event {payload['n']} is in two files"
            seen[payload["n"]] = document["event_id"]
        return set(seen)

    written_before = check_complete()
    assert 40 <= len(written_before) < 300, "killed in the middle of the burst"

    run_agent(*args, name="second")
    await harness.wait_until(lambda: len(final_files(spool)) >= 300, 40, "every event as a file")
    await asyncio.sleep(0.3)
    assert check_complete() == set(range(300))
    assert len(final_files(spool)) == 300
    assert [p.name for p in spool.iterdir() if p.name.startswith(".")] == [], (
        "stale temp files are cleaned at start-up"
    )


async def test_raw_format_writes_body_and_meta(
    running: harness.Relay, run_agent, tmp_path: pathlib.Path
) -> None:
    spool = tmp_path / "spool"
    run_agent(*agent_args(running, "--dir", str(spool), "--dir-format", "raw"))
    body = b"\x00\x01 not utf-8 \xff"
    assert await post(running.input_url(), body) == 200
    await harness.wait_until(
        lambda: spool.exists() and any(p.name.endswith(".meta.json") for p in spool.iterdir()),
        20,
        "the meta file",
    )
    [body_file, meta_file] = final_files(spool)
    assert body_file.read_bytes() == body
    meta = json.loads(meta_file.read_text())
    assert meta["body_file"] == body_file.name and meta["bucket"] == "quickstart"


# ---- the config file ------------------------------------------------------------------


async def test_a_config_file_with_two_buckets_to_two_destinations(
    running: harness.Relay, run_agent, tmp_path: pathlib.Path
) -> None:
    await running.cli("bucket", "create", "exports")
    exports_input = (await running.cli_json("input", "create", "--bucket", "exports"))["id"]
    created = await running.cli_json(
        "token", "create", "--bucket", "quickstart", "--bucket", "exports"
    )
    spool = tmp_path / "spool"
    config_file = tmp_path / "agent.toml"
    async with harness.Target() as target:
        config_file.write_text(
            textwrap.dedent(
                f"""\
                # two buckets, two destinations, one process
                server = "{running.grpc_address}"
                insecure = true
                token_env = "MY_AGENT_TOKEN"
                name = "two-buckets"

                [[subscription]]
                bucket = "quickstart"
                forward = "{target.url}/hooks"
                max_in_flight = 4
                timeout = 5

                [[subscription]]
                bucket = "exports"
                dir = "spool"     # relative to this file
                """
            )
        )
        env = {"MY_AGENT_TOKEN": created["token"]}
        checked = harness.start_agent_args(running, "check", "-c", str(config_file), env=env)
        assert await checked.wait_exit() == 0, checked.log_text()
        report = checked.log_text()
        assert "valid, 2 subscriptions" in report
        assert "ok    subscription[0] (bucket quickstart -> forward" in report
        assert "ok    subscription[1] (bucket exports -> dir" in report
        assert created["token"].split(".", 1)[1] not in report

        agent = run_agent("run", "-c", str(config_file), "--log-format", "json", env=env)
        assert await post(running.input_url(tail="/a"), b"to the target") == 200
        assert await post(running.input_url(exports_input), b"to the spool") == 200
        await target.wait_for(1)
        await harness.wait_until(lambda: spool.exists() and final_files(spool), 20, "a file")
        assert target.received[0].body == b"to the target"
        assert target.received[0].path == "/hooks/a"
        [written] = final_files(spool)
        document = json.loads(written.read_text())
        assert (document["bucket"], document["body"]) == ("exports", "to the spool")

        agent.proc.terminate()
        assert await agent.wait_exit() == 0
    log = agent.log_text()
    assert created["token"].split(".", 1)[1] not in log, "the secret is never logged"
    subscriptions = {
        json.loads(line).get("subscription")
        for line in log.splitlines()
        if line.startswith("{") and '"connected"' in line
    }
    assert subscriptions == {"quickstart", "exports"}


async def test_check_says_which_subscription_the_server_refuses(
    running: harness.Relay, tmp_path: pathlib.Path
) -> None:
    await running.cli("bucket", "create", "elsewhere")
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f'server = "{running.grpc_address}"\ninsecure = true\n'
        '[[subscription]]\nbucket = "quickstart"\ndir = "a"\n'
        '[[subscription]]\nbucket = "elsewhere"\ndir = "b"\n'
    )
    checked = harness.start_agent_args(running, "check", "-c", str(config_file))
    assert await checked.wait_exit() == 4
    report = checked.log_text()
    assert "ok    subscription[0] (bucket quickstart" in report
    assert "FAIL  subscription[1] (bucket elsewhere -> dir" in report
    assert "'elsewhere' is not in this token's scope" in report


async def test_an_invalid_config_file_names_the_key_and_the_line(
    relay: harness.Relay, tmp_path: pathlib.Path
) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'server = "127.0.0.1:1"\n\n[[subscription]]\nbucket = "a"\nforwrd = "http://x/"\n'
    )
    config_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    agent = harness.start_agent_args(relay, "run", "-c", str(config_file))
    assert await agent.wait_exit() == 2
    assert (
        f"error: {config_file} line 5: unknown key 'forwrd' in subscription[0] "
        "(did you mean 'forward'?)"
    ) in agent.log_text()
    assert not os.path.exists(tmp_path / "spool")
