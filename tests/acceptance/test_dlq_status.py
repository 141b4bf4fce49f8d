"""The dead-letter queue from the CLI (filters, show, bulk replay) and `relay-server status`."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tests.acceptance import harness
from tests.acceptance.test_delivery import post


async def _dead(running: harness.Relay, *filters: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await running.cli_json("dlq", "list", *filters)
    return result


async def _ids(running: harness.Relay, *filters: str) -> set[str]:
    return {str(e["id"]) for e in await _dead(running, *filters)}


async def _install(running: harness.Relay) -> tuple[dict[str, str], str]:
    await asyncio.gather(
        *(running.cli("bucket", "create", b, "--max-attempts", "2") for b in ("alpha", "beta"))
    )
    made = await asyncio.gather(
        *(
            running.cli_json("input", "create", "--bucket", b, "--name", n)
            for n, b in (("a1", "alpha"), ("a2", "alpha"), ("b1", "beta"))
        ),
        running.cli_json("token", "create", "--bucket", "alpha", "--bucket", "beta"),
    )
    return {i["name"]: i["id"] for i in made[:3]}, made[3]["token"]


async def _make_three_dead(
    running: harness.Relay, agents: Any, target: harness.Target
) -> tuple[dict[str, str], dict[str, str]]:
    """Events 'one' (alpha/a1), 'two' (alpha/a2), 'three' (beta/b1), each dead after 2 NACKs;
    returns (input name -> id, body -> event id)."""
    inputs, token = await _install(running)
    agents(target.url, "--bucket", "beta", bucket="alpha", token=token)
    for name, tail, body in (("a1", "/alpha", b"one"), ("a2", "/alpha", b"two")):
        assert (await post(running.input_url(inputs[name], tail=tail), body))[0] == 200
    assert (await post(running.input_url(inputs["b1"], tail="/beta"), b"three"))[0] == 200
    await target.wait_for(6)
    for _ in range(50):
        listed = await _dead(running)
        if len(listed) == 3:
            break
        await asyncio.sleep(0.1)
    assert len(listed) == 3
    by_input = {e["input_id"]: str(e["id"]) for e in listed}
    events = {b: by_input[inputs[n]] for n, b in (("a1", "one"), ("a2", "two"), ("b1", "three"))}
    return inputs, events


def _failing_target() -> tuple[harness.Target, dict[str, bool]]:
    healthy = {"on": False}

    def respond(_n: int, request: web.Request) -> web.Response:
        if healthy["on"]:
            return web.Response(status=200)
        return web.Response(status=503 if "beta" in request.path else 500)

    return harness.Target(respond), healthy


async def test_dlq_list_filters_show_and_status(running, agents) -> None:  # type: ignore[no-untyped-def]
    target, _healthy = _failing_target()
    async with target:
        inputs, events = await _make_three_dead(running, agents, target)
        one, two, three = events["one"], events["two"], events["three"]
        found = await asyncio.gather(
            _ids(running, "--bucket", "alpha"),
            _ids(running, "--input", inputs["a2"]),
            _ids(running, "--error", "http 503"),
            _ids(running, "--older-than", "1h"),
            _ids(running, "--newer-than", "1h", "--error", "HTTP 500"),
        )
        assert found == [{one, two}, {two}, {three}, set(), {one, two}]

        shown, human, missing, status = await asyncio.gather(
            running.cli_json("dlq", "show", one),
            running.cli("dlq", "show", three),
            running.cli("dlq", "show", running.input_id, check=False),
            running.cli_json("status"),
        )
    assert shown["event"]["body"] == "one"
    (dead,) = shown["dead"]
    assert dead["attempts"] == 2 and dead["last_error"] == "nack: HTTP 500"
    assert [a["outcome"] for a in dead["attempt_log"]] == ["nack", "nack"]
    assert "dead deliveries" in human.stdout and "nack: HTTP 503" in human.stdout
    assert "three" in human.stdout, "the decrypted request is printed"
    assert missing.returncode != 0
    assert f"no dead delivery for event {running.input_id}" in missing.stderr

    assert status["deliveries"] == {"pending": 0, "leased": 0, "delivered": 0, "dead": 3}
    assert status["oldest_pending_age_ms"] is None
    assert status["schema_revision"]
    assert status["database_url"].startswith("sqlite:///")
    assert status["disk"]["database_bytes"] > 0
    assert any(f["path"].endswith("stowhook.db") for f in status["disk"]["database_files"])
    assert status["disk"]["key_folder"]["bytes"] > 0


async def test_dlq_bulk_replay_of_a_filter_with_a_dry_run_first(running, agents) -> None:  # type: ignore[no-untyped-def]
    target, healthy = _failing_target()
    async with target:
        _inputs, events = await _make_three_dead(running, agents, target)
        dry = await running.cli_json("dlq", "replay", "--all", "--bucket", "alpha", "--dry-run")
        assert (dry["count"], dry["dry_run"]) == (2, True)
        assert await _ids(running) == set(events.values()), "--dry-run changes nothing"
        assert len(target.received) == 6

        healthy["on"] = True
        replayed = await running.cli_json("dlq", "replay", "--all", "--bucket", "alpha")
        assert replayed["count"] == 2
        await target.wait_for(8)
        assert sorted(r.body for r in target.received[6:]) == [b"one", b"two"]
        left, status = await asyncio.gather(_ids(running), running.cli_json("status"))
        assert left == {events["three"]}
        await asyncio.sleep(0.3)
        assert len(target.received) == 8, "nothing else was replayed"
    assert status["deliveries"]["dead"] == 3, "replayed dead deliveries stay, as history"
    assert status["deliveries"]["delivered"] + status["deliveries"]["leased"] == 2
