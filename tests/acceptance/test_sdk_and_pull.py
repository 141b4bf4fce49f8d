"""`relay-agent pull` in a real shell pipe, and an SDK worker as a real process."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shlex
import signal
import sys
import textwrap
import time

from tests.acceptance import harness
from tests.acceptance.test_delivery import post

WAIT_S = 30.0


async def post_all(relay: harness.Relay, bodies: list[str]) -> None:
    for body in bodies:  # one after the other: oldest first is also the order posted
        status, _, _ = await post(relay.input_url(), body.encode())
        assert status == 200


async def run_shell(command: str, env: dict[str, str]) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_shell(
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    return out.decode(), err.decode()


async def wait_for_states(relay: harness.Relay, expected: dict[str, int]) -> dict[str, dict]:
    """Delivery states once their counts are as expected (settlements land asynchronously)."""
    deadline = time.monotonic() + 10
    while True:
        states = await harness.delivery_states(relay)
        counts = {state: 0 for state in expected}
        for delivery in states.values():
            counts[delivery["state"]] = counts.get(delivery["state"], 0) + 1
        if counts == expected:
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"delivery states never became {expected}: {counts}")
        await asyncio.sleep(0.1)


async def test_pull_into_head_acks_the_lines_head_read_and_keeps_the_rest(
    running, tmp_path: pathlib.Path
) -> None:
    bodies = [json.dumps({"n": n}) for n in range(5)]
    await post_all(running, bodies)
    env = harness.agent_env(running)
    status_file = tmp_path / "pull.status"
    pull = shlex.join(harness.pull_args(running, "--max", "5"))
    out, err = await run_shell(
        f"{{ {pull}; echo $? > {shlex.quote(str(status_file))}; }} | head -n 2", env
    )

    lines = out.splitlines()
    assert len(lines) == 2, out
    printed = [json.loads(line) for line in lines]
    assert {record["body"] for record in printed} <= set(bodies)
    assert status_file.read_text().strip() == "0", err
    assert "Traceback" not in err and "BrokenPipe" not in err, err

    states = await wait_for_states(running, {"delivered": 2, "pending": 3})
    assert {i for i, d in states.items() if d["state"] == "delivered"} == {
        record["id"] for record in printed
    }
    pending = [d for d in states.values() if d["state"] == "pending"]
    assert [d["attempts"] for d in pending] == [1, 1, 1]
    # NACKed for a retry at once: the line head did not read, and the two never printed.
    assert {d["last_error"] for d in pending} == {
        "nack: pull: not printed, or its line was not read"
    }

    # The three events head never read are delivered, exactly once, to the next pull.
    out, err = await run_shell(shlex.join(harness.pull_args(running, "--max", "3")), env)
    rest = [json.loads(line) for line in out.splitlines()]
    assert sorted(record["body"] for record in printed + rest) == sorted(bodies), err
    assert all(record["attempt"] == 2 for record in rest)
    await wait_for_states(running, {"delivered": 5})


async def test_pull_prints_every_field_and_stops_when_idle(running) -> None:
    await post_all(running, ['{"hello": "w\u00f6rld"}'])
    status, _, _ = await post(running.input_url(tail="/raw") + "?x=1", bytes([0xFF, 0x00]))
    assert status == 200
    proc = await asyncio.create_subprocess_exec(
        *harness.pull_args(running, "--wait", "0.5"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=harness.agent_env(running),
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)

    assert proc.returncode == 0, err.decode()
    first, second = (json.loads(line) for line in out.decode().splitlines())
    assert first["body"] == '{"hello": "w\u00f6rld"}'
    assert "body_base64" not in first
    assert second["body_base64"] == "/wA="
    assert (second["method"], second["path"], second["query"]) == ("POST", "/raw", "x=1")
    assert set(first) == {
        *("id", "bucket", "input_id", "method", "path", "query", "headers", "body"),
        *("received_at", "attempt", "replay", "lease_id"),
    }
    assert first["bucket"] == "quickstart" and first["input_id"] == running.input_id
    assert first["attempt"] == 1 and first["replay"] is False
    assert first["received_at"].endswith("+00:00")
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in first["headers"])
    await wait_for_states(running, {"delivered": 2})


async def test_a_dry_run_prints_everything_and_leaves_it_queued(running) -> None:
    bodies = [json.dumps({"n": n}) for n in range(3)]
    await post_all(running, bodies)
    out, err = await run_shell(
        shlex.join(harness.pull_args(running, "--no-ack", "--wait", "0.5")),
        harness.agent_env(running),
    )
    assert sorted(json.loads(line)["body"] for line in out.splitlines()) == sorted(bodies), err
    states = await wait_for_states(running, {"pending": 3})
    assert {d["last_error"] for d in states.values()} == {
        "nack: pull --no-ack: dry run, put back unacknowledged"
    }


async def test_pull_exits_3_when_the_token_is_refused(running) -> None:
    key_id = running.token.split(".")[0]
    proc = await asyncio.create_subprocess_exec(
        *harness.pull_args(running),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=harness.agent_env(running, token=f"{key_id}.wrong-secret"),
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 3
    assert out == b""
    assert "refused the token" in err.decode()


WORKER = textwrap.dedent(
    """
    import asyncio, os, sys

    import relay_agent
    from relay_agent import logging as agent_logging


    async def main(server: str, expected: int) -> None:
        agent_logging.configure("json", "info")  # to stderr: stdout is the test's
        settings = relay_agent.AgentSettings(
            server=server,
            token=os.environ["STOWHOOK_TOKEN"],
            buckets=("quickstart",),
            insecure=True,
        )
        handled = 0
        async with relay_agent.Consumer(settings) as consumer:
            async for event in consumer:
                body = event.json()
                if body["ok"]:
                    await event.ack()
                    print("acked", event.id, flush=True)
                else:
                    await event.nack(retry_after=600, reason=f"not ok: {body['n']}")
                    print("nacked", event.id, flush=True)
                handled += 1
                if handled == expected:
                    break


    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_an_sdk_worker_acks_some_events_and_nacks_others(
    running, tmp_path: pathlib.Path
) -> None:
    bodies = [json.dumps({"n": n, "ok": n % 2 == 0}) for n in range(6)]
    await post_all(running, bodies)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        running.grpc_address,
        "6",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=harness.agent_env(running),
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    handled = dict(line.split()[::-1] for line in out.decode().splitlines())
    assert sorted(handled.values()) == ["acked"] * 3 + ["nacked"] * 3

    states = await wait_for_states(running, {"delivered": 3, "pending": 3})
    for event_id, outcome in handled.items():
        delivery = states[event_id]
        assert delivery["attempts"] == 1
        if outcome == "acked":
            assert delivery["state"] == "delivered" and delivery["last_error"] is None
        else:
            assert delivery["state"] == "pending"
            assert "not ok: " in delivery["last_error"]
    nacked_bodies = {
        json.loads(body)["n"] for body in bodies if not json.loads(body)["ok"]
    }  # 1, 3, 5
    reasons = {
        states[i]["last_error"].rsplit(" ", 1)[-1] for i, o in handled.items() if o == "nacked"
    }
    assert reasons == {str(n) for n in nacked_bodies}


def sdk_doc_example() -> str:
    """The worker in docs/sdk.md, the first Python block: the how-to must stay runnable."""
    doc = (pathlib.Path(__file__).parents[2] / "docs" / "sdk.md").read_text()
    return doc.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_worker_in_the_sdk_docs_runs_and_stops_on_sigterm(
    running, tmp_path: pathlib.Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(sdk_doc_example())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**harness.agent_env(running), "STOWHOOK_SERVER": running.grpc_address},
    )
    try:
        await post_all(running, ['{"hello": 1}', "not json"])
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
        assert line.decode().endswith("/ #1: {'hello': 1}\n")
        states = await wait_for_states(running, {"delivered": 1, "dead": 1})
        assert any("not JSON" in (d["last_error"] or "") for d in states.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    assert "connected" in err.decode()
