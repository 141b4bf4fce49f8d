"""What strangers and misconfigured agents see: refusals with clear messages, nothing stored."""

from __future__ import annotations

import asyncio
import secrets

from aiohttp import ClientSession, web

from tests.acceptance import harness
from tests.acceptance.test_delivery import post


async def test_the_database_holds_no_plaintext_body_headers_or_query(running, agents) -> None:
    body_marker = secrets.token_hex(16)
    header_marker = secrets.token_hex(16)
    query_marker = secrets.token_hex(16)
    async with harness.Target() as target:
        agents(target.url)
        status, _, _ = await post(
            running.input_url() + f"?q={query_marker}",
            f'{{"secret": "{body_marker}"}}'.encode(),
            {"X-Api-Secret": header_marker},
        )
        assert status == 200
        await target.wait_for(1)
        assert body_marker.encode() in target.received[0].body

    running.stop()  # also checkpoints the WAL into the main file
    files = list((running.home / "var").iterdir())
    assert any(f.name == "stowhook.db" for f in files)
    for path in files:
        data = path.read_bytes()
        for marker in (body_marker, header_marker, query_marker):
            assert marker.encode() not in data, f"{marker} found in plaintext in {path.name}"
    logs = running.log_text()
    for marker in (body_marker, header_marker, query_marker):
        assert marker not in logs, "payloads never reach the logs"


async def test_a_wrong_secret_makes_the_agent_exit_saying_the_token_was_refused(
    running, agents
) -> None:
    key_id = running.token.split(".")[0]
    agent = agents("http://127.0.0.1:9", token=f"{key_id}.{secrets.token_urlsafe(32)}")
    code = await agent.wait_exit()
    assert code != 0
    assert "refused the token" in agent.log_text()
    assert key_id in agent.log_text()


async def test_a_bucket_outside_the_token_scope_is_refused_by_name(running, agents) -> None:
    await running.cli("bucket", "create", "payments")
    agent = agents("http://127.0.0.1:9", bucket="payments")
    code = await agent.wait_exit()
    assert code != 0
    assert "'payments' is not in this token's scope" in agent.log_text()


async def test_a_revoked_token_is_refused(running, agents) -> None:
    key_id = running.token.split(".")[0]
    await running.cli("token", "revoke", key_id)
    agent = agents("http://127.0.0.1:9")
    assert await agent.wait_exit() != 0
    assert "refused the token" in agent.log_text()


async def test_an_event_out_of_attempts_goes_to_the_dlq_and_replays(running, agents) -> None:
    await running.cli("bucket", "create", "fragile", "--max-attempts", "3")
    created = await running.cli_json("input", "create", "--bucket", "fragile")
    token = (await running.cli_json("token", "create", "--bucket", "fragile"))["token"]
    healthy = {"on": False}

    def respond(_n: int, _r: web.Request) -> web.Response:
        return web.Response(status=200 if healthy["on"] else 500)

    async with harness.Target(respond) as target:
        agents(target.url, bucket="fragile", token=token)
        assert (await post(running.input_url(created["id"]), b"poison?"))[0] == 200
        await target.wait_for(3)

        async def dead() -> list[dict[str, object]]:
            return await running.cli_json("dlq", "list", "--bucket", "fragile")

        for _ in range(100):
            if await dead():
                break
            await asyncio.sleep(0.1)
        listed = await dead()
        assert len(listed) == 1
        assert listed[0]["deliveries"][0]["attempts"] == 3
        assert listed[0]["deliveries"][0]["last_error"] == "nack: HTTP 500"
        await asyncio.sleep(1.5)
        assert len(target.received) == 3, "no attempt after the last one"

        healthy["on"] = True
        replayed = await running.cli_json("dlq", "replay", str(listed[0]["id"]))
        assert len(replayed["deliveries"]) == 1
        await target.wait_for(4)
        assert target.received[3].body == b"poison?"
        for _ in range(50):
            shown = await running.cli_json("event", "show", str(listed[0]["id"]))
            states = [d["state"] for d in shown["summary"]["deliveries"]]
            if states == ["dead", "delivered"]:
                break
            await asyncio.sleep(0.1)
        assert states == ["dead", "delivered"]
        assert shown["summary"]["deliveries"][1]["replay"] is True
        assert await dead() == []


async def test_unknown_inputs_answer_200_and_store_nothing(running) -> None:
    unknown = "01a20000-0000-7000-8000-000000000000"
    for url in (running.input_url(unknown), running.input_url("not-a-uuid", tail="/x")):
        status, _headers, body = await post(url, b"who is there")
        assert (status, body) == (200, b"")
    assert await running.cli_json("event", "list") == []


async def test_a_body_over_the_limit_gets_413_and_is_not_stored(relay) -> None:
    relay.start("--max-body-bytes", "1000")
    await relay.wait_ready()
    status, _, _ = await post(relay.input_url(), b"x" * 1001)
    assert status == 413
    async with ClientSession() as session:  # no Content-Length: chunked upload

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(4):
                yield b"y" * 400

        async with session.post(relay.input_url(), data=chunks()) as resp:
            assert resp.status == 413
        # Expect: 100-continue is refused before the body is sent.
        async with session.post(relay.input_url(), data=b"z" * 5000, expect100=True) as resp:
            assert resp.status == 413
    assert await relay.cli_json("event", "list") == []
    status, _, _ = await post(relay.input_url(), b"x" * 1000)
    assert status == 200
    assert len(await relay.cli_json("event", "list")) == 1


async def test_the_server_refuses_to_start_without_a_key(relay) -> None:
    (relay.home / "var" / "stowhook.key").unlink()
    result = await relay.cli("serve", check=False)
    assert result.returncode != 0
    assert "does not exist" in result.stderr
    assert "relay-server keys generate" in result.stderr
