"""The core path with real processes: webhook in -> SQLite -> agent stream -> internal URL."""

from __future__ import annotations

import asyncio
import io
import time

import multidict
import yarl
from aiohttp import ClientSession, web

from tests.acceptance import harness


async def post(
    url: str, body: bytes = b"{}", headers: object = None
) -> tuple[int, dict[str, str], bytes]:
    async with ClientSession() as session:
        async with session.post(yarl.URL(url, encoded=True), data=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def test_a_webhook_reaches_the_target_unchanged(running, agents) -> None:
    async with harness.Target() as target:
        agents(f"{target.url}/hooks")
        body = bytes(range(256)) * 40 + b"\x00\xff"
        headers = multidict.CIMultiDict(
            [
                ("Content-Type", "application/octet-stream"),
                ("X-Custom", "some value; with=stuff"),
                ("X-Dup", "first"),
                ("X-Dup", "second"),
            ]
        )
        status, response_headers, response_body = await post(
            running.input_url(tail="/github/push") + "?a=1&b=%20x&a=2", body, headers
        )

        assert (status, response_body) == (200, b"")
        assert "aiohttp" not in response_headers.get("Server", "").lower()
        assert "python" not in response_headers.get("Server", "").lower()
        await target.wait_for(1)
        got = target.received[0]
        assert got.method == "POST"
        assert got.path == "/hooks/github/push"
        assert got.query == "a=1&b=%20x&a=2"
        assert got.body == body
        assert got.header("Content-Type") == "application/octet-stream"
        assert got.header("X-Custom") == "some value; with=stuff"
        assert [v for k, v in got.headers if k.lower() == "x-dup"] == ["first", "second"]
        assert got.header("X-Stowhook-Attempt") == "1"


async def test_events_sent_while_no_agent_runs_all_arrive_later(running, agents) -> None:
    bodies = [f'{{"n": {n}}}'.encode() for n in range(100)]
    results = await asyncio.gather(*(post(running.input_url(), b) for b in bodies))
    assert [status for status, _, _ in results] == [200] * 100

    async with harness.Target() as target:
        agents(target.url, "--max-in-flight", "32")
        await target.wait_for(100, timeout=60)
        await asyncio.sleep(0.5)  # anything beyond 100 would be a duplicate
        assert sorted(r.body for r in target.received) == sorted(bodies)
        assert len(set(target.event_ids())) == 100

    delivered = await running.cli_json("event", "list", "--state", "delivered", "--limit", "500")
    assert len(delivered) == 100


async def test_a_failing_target_is_retried_with_growing_delays_until_it_accepts(
    running, agents
) -> None:
    async with harness.Target(lambda n, _: web.Response(status=500 if n <= 3 else 200)) as target:
        agents(target.url)
        status, _, _ = await post(running.input_url(), b"retry me")
        assert status == 200
        await target.wait_for(4)
        await asyncio.sleep(1.0)
        assert len(target.received) == 4, "delivered exactly once after it succeeded"
        assert [r.header("X-Stowhook-Attempt") for r in target.received] == ["1", "2", "3", "4"]
        times = [r.at for r in target.received]
        assert times == sorted(times) and len(set(times)) == 4

    event_id = target.event_ids()[0]
    shown = await running.cli_json("event", "show", event_id)
    delivery = shown["summary"]["deliveries"][0]
    assert (delivery["state"], delivery["attempts"]) == ("delivered", 4)
    assert [a["outcome"] for a in shown["attempts"]] == ["nack", "nack", "nack", "ack"]
    assert shown["attempts"][0]["error"] == "HTTP 500"


async def test_retry_after_from_the_target_is_honoured(relay, agents) -> None:
    relay.start("--retry-cap", "10s")  # Retry-After is honoured up to the backoff cap
    await relay.wait_ready()

    def respond(n: int, _: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "2"}) if n == 1 else web.Response()

    async with harness.Target(respond) as target:
        agents(target.url)
        await post(relay.input_url(), b"later please")
        await target.wait_for(2, timeout=20)
        gap = target.received[1].at - target.received[0].at
        assert gap >= 1.9, f"retried after {gap:.2f}s, before the target's Retry-After of 2s"


async def test_leases_of_a_killed_agent_go_to_another_agent(running, agents) -> None:
    async def hang(_n: int, _r: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response()

    async with harness.Target(hang) as stuck, harness.Target() as healthy:
        first = agents(stuck.url, "--timeout", "60", name="first")
        for n in range(3):
            assert (await post(running.input_url(), f"held {n}".encode()))[0] == 200
        await stuck.wait_for(3)
        assert first.kill() == -9

        agents(healthy.url, name="second")
        await healthy.wait_for(3, timeout=30)
        assert sorted(r.body for r in healthy.received) == [b"held 0", b"held 1", b"held 2"]
        assert {r.header("X-Stowhook-Attempt") for r in healthy.received} == {"2"}


async def test_an_event_answered_200_survives_a_server_kill(relay, agents) -> None:
    relay.start()
    await relay.wait_ready()
    status, _, _ = await post(relay.input_url(), b"survivor")
    assert status == 200
    relay.kill()  # SIGKILL right after the 200

    relay.start()
    await relay.wait_ready()
    async with harness.Target() as target:
        agents(target.url)
        await target.wait_for(1)
        assert target.received[0].body == b"survivor"


async def test_a_connected_agent_reconnects_after_the_server_restarts(running, agents) -> None:
    async with harness.Target() as target:
        agent = agents(target.url)
        await post(running.input_url(), b"before")
        await target.wait_for(1)
        # Kill only once the ACK is committed: a kill before it would (rightly) redeliver.
        for _ in range(100):
            listed = await running.cli_json("event", "list", "--state", "delivered")
            if listed:
                break
            await asyncio.sleep(0.1)
        assert len(listed) == 1
        running.kill()
        await asyncio.sleep(1)
        running.start()
        await running.wait_ready()
        await post(running.input_url(), b"after")
        await target.wait_for(2, timeout=40)
        assert [r.body for r in target.received] == [b"before", b"after"]
        assert agent.proc.poll() is None, "the agent keeps running through server restarts"


async def test_sigterm_lets_the_agent_finish_what_it_holds(running, agents) -> None:
    async def slow(_n: int, _r: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response()

    async with harness.Target(slow) as target:
        agent = agents(target.url)
        await post(running.input_url(), b"in progress")
        await target.wait_for(1)
        started = time.monotonic()
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
        assert time.monotonic() - started >= 0.5, "the agent waited for the delivery"

    shown = await running.cli_json("event", "list")
    assert shown[0]["deliveries"][0]["state"] == "delivered"


async def test_a_large_webhook_is_kept_sealed_beside_the_database_and_arrives_whole(
    running, agents
) -> None:
    secret = b'"card": "4242424242424242"'
    body = (secret + b"0123456789abcdef" * 128) * 1500  # ~3 MiB: kept as a file, not a row
    async with ClientSession() as session:
        async with session.post(running.input_url(), data=io.BytesIO(body)) as resp:
            assert resp.status == 200

    folder = running.db_path.with_name(running.db_path.name + ".bodies")
    (stored,) = folder.iterdir()
    assert stored.stat().st_size > len(body) and secret not in stored.read_bytes()
    shown = await running.cli("event", "show", stored.name, "--body-only")
    assert shown.stdout == body.decode(), "event show opens the file"
    async with harness.Target() as target:
        agents(target.url)
        await target.wait_for(1)
        assert target.received[0].body == body
        assert target.received[0].header("X-Stowhook-Event-Id") == stored.name
