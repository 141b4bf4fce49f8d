"""Response modes through real processes: what a webhook's sender gets back.

A real relay-server, a real relay-agent and a real HTTP target: `wait` relays the
target's own answer (or times out with 504 / the fallback while the event is still
delivered), `static` sends the configured answer, and no answer of any kind names the
software behind it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import web

from relay_server import __version__
from tests.acceptance import harness
from tests.acceptance.test_delivery import post

# What would fingerprint the server: its software, its framework, its runtime, versions.
FINGERPRINTS = ("python", "aiohttp", "stowhook", "relay-server", "uvloop", "grpc", __version__)


def assert_anonymous(status: int, headers: dict[str, str], what: str) -> None:
    assert headers.get("Server", "") == "", f"{what} ({status}) names a server: {headers}"
    for name, value in headers.items():
        for word in FINGERPRINTS:
            assert word not in value.lower(), f"{what} ({status}): {name}: {value!r} has {word!r}"


async def respond(relay: harness.Relay, *args: str) -> None:
    await relay.cli("input", "respond", relay.input_id, *args)


async def test_wait_relays_the_destination_answer(running, agents) -> None:
    def answer(_n: int, request: web.Request) -> web.Response:
        return web.Response(
            status=201,
            headers={"X-Answered-By": "target", "Content-Type": "text/plain"},
            text=f"hello {request.path}",
        )

    await respond(running, "--mode", "wait", "--timeout", "20s")
    async with harness.Target(answer) as target:
        agents(target.url)
        status, headers, body = await post(running.input_url(tail="/orders"), b'{"id": 7}')
        assert target.received[0].body == b'{"id": 7}', "the event was forwarded first"

    assert (status, body) == (201, b"hello /orders"), "the target's own status and body"
    assert headers["X-Answered-By"] == "target"
    assert headers["Content-Type"].startswith("text/plain")
    # The target is an aiohttp app: its own Server header must not come through either.
    assert_anonymous(status, headers, "the relayed answer")
    (event_id,) = target.event_ids()
    await harness.assert_delivered_once(running, event_id)


async def test_wait_times_out_with_504_and_the_event_is_delivered_later(running, agents) -> None:
    async def slow(_n: int, _request: web.Request) -> web.Response:
        await asyncio.sleep(2.5)
        return web.Response(status=200, text="too late")

    await respond(running, "--mode", "wait", "--timeout", "1s")
    async with harness.Target(slow) as target:
        agents(target.url)
        started = time.monotonic()
        status, headers, body = await post(running.input_url(), b"slow one")
        waited = time.monotonic() - started
        assert (status, body) == (504, b""), "no answer within the timeout"
        assert 0.9 <= waited < 2.4, f"answered after {waited:.2f}s, not at the 1s timeout"
        assert_anonymous(status, headers, "the timeout answer")
        await target.wait_for(1)
        (event_id,) = target.event_ids()
        await harness.wait_deliveries(
            running, lambda d: d[event_id]["state"] == "delivered", 15, "the slow delivery"
        )
    assert target.received[0].body == b"slow one"


async def test_wait_with_a_fallback_answers_the_configured_answer_on_timeout(
    running, agents
) -> None:
    async def slow(_n: int, _request: web.Request) -> web.Response:
        await asyncio.sleep(2.5)
        return web.Response(status=200)

    body_file = running.home / "queued.json"
    body_file.write_bytes(b'{"queued": true}')
    await respond(
        running,
        *("--mode", "wait", "--timeout", "500ms", "--fallback", "--status", "202"),
        *("--header", "Content-Type: application/json", "--body-file", str(body_file)),
    )
    async with harness.Target(slow) as target:
        agents(target.url)
        status, headers, body = await post(running.input_url(), b"{}")
        assert (status, body) == (202, b'{"queued": true}')
        assert headers["Content-Type"] == "application/json"
        await target.wait_for(1)


async def test_a_destination_error_is_relayed_and_the_event_retried(running, agents) -> None:
    def flaky(n: int, _request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy") if n == 1 else web.Response(status=200)

    await respond(running, "--mode", "wait", "--timeout", "20s")
    async with harness.Target(flaky) as target:
        agents(target.url)
        status, _, body = await post(running.input_url(), b"retry me")
        assert (status, body) == (503, b"busy"), "the sender sees what the target said"
        await target.wait_for(2)
    (event_id,) = set(target.event_ids())
    attempts = await harness.assert_delivered_once(running, event_id)
    assert [a["outcome"] for a in attempts] == ["nack", "ack"]
    assert attempts[0]["error"] == "HTTP 503"


async def test_static_answers_the_configured_status_headers_and_body(running) -> None:
    body_file = running.home / "answer.txt"
    body_file.write_bytes(b"thanks, stored\n")
    await respond(
        running,
        *("--mode", "static", "--status", "202", "--header", "Content-Type: text/plain"),
        *("--header", "X-Request-Handled: yes", "--body-file", str(body_file)),
    )
    listed = await running.cli("input", "list")
    assert "static 202 (2 headers, 15-byte body)" in listed.stdout
    status, headers, body = await post(running.input_url(), b"{}")
    assert (status, body) == (202, b"thanks, stored\n")
    assert headers["X-Request-Handled"] == "yes"
    assert headers["Content-Type"] == "text/plain"
    assert_anonymous(status, headers, "the static answer")
    (event,) = await running.cli_json("event", "list")
    assert event["deliveries"][0]["state"] == "pending", "answered after it was stored"


async def test_no_answer_names_the_server_software(relay, agents) -> None:
    """accept, static, wait, unknown input (404 mode), 413, 503: no fingerprint anywhere."""
    await relay.cli("bucket", "create", "tiny", "--ephemeral")
    tiny = (await relay.cli_json("input", "create", "--bucket", "tiny"))["id"]
    static = (await relay.cli_json("input", "create", "--bucket", "quickstart"))["id"]
    await relay.cli("input", "respond", static, "--mode", "static", "--status", "201")
    wait = (await relay.cli_json("input", "create", "--bucket", "quickstart"))["id"]
    await relay.cli("input", "respond", wait, "--mode", "wait", "--timeout", "10s")
    relay.start("--unknown-input", "404", "--max-body-bytes", "4096", "--ephemeral-max-bytes", "64")
    await relay.wait_ready()
    answers: list[tuple[str, int, dict[str, str], bytes]] = []

    async def record(what: str, url: str, body: bytes = b"{}") -> int:
        status, headers, got = await post(url, body)
        answers.append((what, status, headers, got))
        return status

    assert await record("accept", relay.input_url()) == 200
    assert await record("static", relay.input_url(static)) == 201
    assert await record("unknown input", relay.input_url(str(uuid.uuid4()))) == 404
    assert await record("too large", relay.input_url(), b"x" * 5000) == 413
    assert await record("memory full", relay.input_url(tiny), b"y" * 100) == 503
    async with harness.Target() as target:
        agents(target.url)
        assert await record("wait", relay.input_url(wait)) == 200
    for what, status, headers, body in answers:
        assert_anonymous(status, headers, what)
        for word in FINGERPRINTS:
            assert word.encode() not in body.lower(), f"{what} body names {word!r}: {body!r}"
    memory_full = next(a for a in answers if a[0] == "memory full")
    assert memory_full[2]["Retry-After"].isdigit()


async def test_unknown_inputs_answer_200_by_default_and_404_when_asked(relay) -> None:
    stranger = relay.input_url(str(uuid.uuid4()))
    relay.start()
    await relay.wait_ready()
    assert (await post(stranger))[:3:2] == (200, b""), "like a real input: no enumeration"
    relay.stop()
    relay.start("--unknown-input", "404")
    await relay.wait_ready()
    status, _, _ = await post(stranger)
    assert status == 404
    assert (await post(relay.input_url()))[0] == 200, "real inputs still answer 200"
    assert await relay.cli_json("event", "list") != [], "and store"
