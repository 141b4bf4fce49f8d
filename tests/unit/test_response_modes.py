"""Response modes and ephemeral payloads: the pure parts, and the agent's answer capture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import click
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay_agent import models as agent_models
from relay_agent import settings as agent_settings
from relay_agent.destinations import http
from relay_proto import relay_pb2
from relay_server import (
    cli,  # noqa: F401  (first: importing it registers the command modules)
    cli_respond,
    models,
)
from relay_server.dispatch import frames
from relay_server.ingress import answers, waiting
from relay_server.store import ephemeral
from tests.unit.test_agent_http import delivery

WAIT = models.ResponseKind.WAIT

# ---- checks on what an operator configures -------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 302, 404, 599])
def test_final_statuses_are_allowed(status: int) -> None:
    answers.check_status(status)


@pytest.mark.parametrize("status", [0, 100, 101, 199, 600, 1000, -1])
def test_other_statuses_are_refused(status: int) -> None:
    with pytest.raises(ValueError, match="between 200 and 599"):
        answers.check_status(status)


@pytest.mark.parametrize(
    ("name", "value"),
    [("Content-Type", "application/json"), ("X-A", ""), ("X-B", "a\tb c"), ("x_c", "~!")],
)
def test_sane_headers_are_allowed(name: str, value: str) -> None:
    answers.check_header(name, value)


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("X A", "1", "not a header name"),
        ("", "1", "not a header name"),
        ("X:A", "1", "not a header name"),
        ("X-" + "a" * 100, "1", "not a header name"),
        ("Content-Length", "5", "server writes it"),
        ("transfer-encoding", "chunked", "server writes it"),
        ("Server", "nginx", "server writes it"),
        ("X-A", "a\r\nSet-Cookie: x=1", "without line breaks"),
        ("X-A", "a\nb", "without line breaks"),
        ("X-A", "caf\u00e9", "printable ASCII"),
        ("X-A", "\x00", "printable ASCII"),
        ("X-A", "x" * 5000, "at most 4096"),
    ],
)
def test_bad_headers_are_refused_saying_why(name: str, value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        answers.check_header(name, value)


def test_a_configured_body_is_capped_and_204_has_none() -> None:
    answers.check_mode(models.ResponseMode(body=b"x" * answers.MAX_STATIC_BODY_BYTES))
    with pytest.raises(ValueError, match="at most 65536 bytes"):
        answers.check_mode(models.ResponseMode(body=b"x" * (answers.MAX_STATIC_BODY_BYTES + 1)))
    with pytest.raises(ValueError, match="204 answer has no body"):
        answers.check_mode(models.ResponseMode(status=204, body=b"x"))


def flags(**given: object) -> models.ResponseMode:
    options: dict[str, object] = {
        "status": None,
        "headers": (),
        "body": None,
        "timeout": None,
        "fallback": False,
    }
    kind = models.ResponseKind(str(given.pop("kind")))
    return cli_respond.response_mode(kind, **(options | given))  # type: ignore[arg-type]


def test_the_cli_builds_each_mode() -> None:
    assert flags(kind="accept") == models.ResponseMode()
    static = flags(kind="static", status=201, headers=("X-A:  b ",), body=b"hi")
    assert (static.status, static.headers, static.body) == (201, (("X-A", "b"),), b"hi")
    wait = flags(kind="wait", timeout="2s", fallback=True, status=202)
    assert (wait.kind, wait.timeout_ms, wait.fallback, wait.status) == (WAIT, 2000, True, 202)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"kind": "accept", "status": 201}, "accept answers 200 with no body"),
        ({"kind": "static", "timeout": "1s"}, "only apply to --mode wait"),
        ({"kind": "static", "fallback": True}, "only apply to --mode wait"),
        ({"kind": "wait", "status": 202}, "need --fallback"),
        ({"kind": "wait", "timeout": "50ms"}, "between 100 ms and 10 minutes"),
        ({"kind": "wait", "timeout": "11m"}, "between 100 ms and 10 minutes"),
        ({"kind": "static", "headers": ("no colon",)}, "Name: value"),
        ({"kind": "static", "status": 600}, "between 200 and 599"),
        ({"kind": "static", "headers": ("Connection: close",)}, "hop-by-hop"),
    ],
)
def test_the_cli_refuses_nonsense_with_a_clear_message(
    given: dict[str, object], message: str
) -> None:
    with pytest.raises(click.UsageError, match=message):
        flags(**given)


def test_the_audit_entry_names_headers_but_never_values_or_the_body() -> None:
    mode = flags(kind="static", headers=("X-Token: s3cr3t",), body=b"private body")
    detail = cli_respond.audit_detail(mode)
    assert "X-Token" in detail and "body_bytes=12" in detail
    assert "s3cr3t" not in detail and "private" not in detail


def test_modes_are_described_for_people() -> None:
    assert answers.describe(models.ResponseMode()) == "accept (200, empty)"
    assert answers.describe(flags(kind="wait", timeout="1.5s")) == "wait up to 1.5s, then 504"


# ---- what an agent sends back ----------------------------------------------------------


def test_a_reply_is_relayed_without_hop_by_hop_or_malformed_headers() -> None:
    got = answers.from_reply(
        201,
        [
            ("Content-Type", "text/plain"),
            ("Transfer-Encoding", "chunked"),
            ("Server", "nginx/1.2"),
            ("X-Bad", "a\r\nb"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ],
        b"hello",
        too_large=False,
    )
    assert got == answers.Answer(
        status=201,
        headers=(("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")),
        body=b"hello",
    )


def test_a_reply_over_the_size_cap_or_with_a_bad_status_becomes_502() -> None:
    cap = answers.MAX_REPLY_BODY_BYTES
    assert answers.from_reply(200, [], b"x" * cap, too_large=False).status == 200
    assert answers.from_reply(200, [], b"x" * (cap + 1), too_large=False) == answers.BAD_GATEWAY
    assert answers.from_reply(200, [], b"", too_large=True) == answers.BAD_GATEWAY
    assert answers.from_reply(99, [], b"", too_large=False) == answers.BAD_GATEWAY
    assert answers.from_reply(204, [], b"dropped", too_large=False).body == b""


def test_a_reply_frame_settles_like_ack_or_nack_and_carries_the_answer() -> None:
    ok = relay_pb2.AgentMessage(reply=relay_pb2.Reply(lease_id="d.1", status=201, body=b"x"))
    bad = relay_pb2.AgentMessage(
        reply=relay_pb2.Reply(lease_id="d.2", status=503, retry_after_ms=2000)
    )
    (acked,) = frames.settlements(ok)
    (nacked,) = frames.settlements(bad)
    assert (acked.outcome, acked.retry_after_ms) == (models.Outcome.ACK, None)
    assert (nacked.outcome, nacked.retry_after_ms, nacked.reason) == (
        models.Outcome.NACK,
        2000,
        "HTTP 503",
    )
    assert frames.answer(ok.reply) == answers.Answer(status=201, body=b"x")


# ---- the waiting registry ---------------------------------------------------------------


async def test_a_waiting_caller_gets_the_answer_handed_over() -> None:
    registry = waiting.Waiting(max_waiters=2)
    with registry.expect("e1", models.ResponseMode(kind=WAIT)) as waiter:
        assert waiter is not None and registry.wanted("e1")
        assert registry.deliver("e1", answers.Answer(status=201))
        assert not registry.deliver("e1", answers.Answer(status=202)), "the first answer wins"
        got = await answers.answer(models.ResponseMode(kind=WAIT), waiter)
    assert got.status == 201
    assert not registry.wanted("e1") and registry.count == 0
    assert not registry.deliver("e1", answers.Answer(status=200)), "nobody waits any more"


async def test_only_wait_mode_registers_and_the_registry_is_bounded() -> None:
    registry = waiting.Waiting(max_waiters=1)
    with registry.expect("e0", models.ResponseMode()) as waiter:
        assert waiter is None and not registry.wanted("e0")
    mode = models.ResponseMode(kind=WAIT, timeout_ms=60_000)
    with registry.expect("e1", mode) as first, registry.expect("e2", mode) as second:
        assert first is not None and second is None
        assert await answers.answer(mode, second) == answers.GATEWAY_TIMEOUT, "answered at once"


async def test_closing_answers_every_caller_with_its_timeout_answer() -> None:
    registry = waiting.Waiting()
    fallback = models.ResponseMode(kind=WAIT, timeout_ms=60_000, fallback=True, status=202)
    with registry.expect("e1", fallback) as waiter:
        pending = asyncio.ensure_future(answers.answer(fallback, waiter))
        await asyncio.sleep(0)
        registry.close()
        assert (await asyncio.wait_for(pending, 1)).status == 202
    with registry.expect("e2", fallback) as late:
        assert late is None, "no caller is held once shutting down"


async def test_a_caller_nobody_answers_gets_504_at_the_timeout() -> None:
    registry = waiting.Waiting()
    mode = models.ResponseMode(kind=WAIT, timeout_ms=100)
    with registry.expect("e1", mode) as waiter:
        got = await asyncio.wait_for(answers.answer(mode, waiter), 2)
    assert got == answers.GATEWAY_TIMEOUT


# ---- ephemeral payload memory ------------------------------------------------------------


def test_payload_memory_is_bounded_and_gives_bytes_back() -> None:
    memory = ephemeral.PayloadMemory(max_bytes=100)
    payload = ephemeral.Payload(path="/p", query="", headers=(("X", "1"),), body=b"x" * 60)
    memory.hold("e1", payload)
    assert memory.used_bytes == payload.size == 64
    with pytest.raises(ephemeral.MemoryFull):
        memory.hold("e2", payload)
    assert memory.take("e1", "d1") is payload
    assert memory.events_of(["d1.3", "d9.1", "garbage"]) == {"e1"}
    memory.drop({"e1"})
    assert memory.used_bytes == 0 and memory.take("e1", "d1") is None
    assert memory.events_of(["d1.3"]) == set()


# ---- the agent captures the target's answer ----------------------------------------------


@pytest.fixture
async def answering_target() -> AsyncIterator[tuple[dict[str, object], str]]:
    answer: dict[str, object] = {"status": 201, "body": b"made"}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            status=int(str(answer["status"])),
            body=bytes(answer["body"]),  # type: ignore[arg-type]
            headers={"X-Answer": "yes", "Content-Type": "text/plain"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield answer, f"http://127.0.0.1:{server.port}/hooks"
    finally:
        await server.close()


async def deliver(url: str, **fields: object) -> agent_models.Outcome:
    settings = agent_settings.HttpDestinationSettings(url=url, timeout_s=5)
    async with http.HttpDestination(settings) as destination:
        return await destination.deliver(delivery(**fields))


async def test_the_agent_captures_the_answer_only_when_a_caller_waits(answering_target) -> None:
    _, url = answering_target
    plain = await deliver(url)
    assert plain == agent_models.Ack(), "no answer is carried when nobody waits"
    wanted = await deliver(url, reply_wanted=True)
    assert isinstance(wanted, agent_models.Ack) and wanted.response is not None
    response = wanted.response
    assert (response.status, response.body, response.body_too_large) == (201, b"made", False)
    names = [name.lower() for name, _ in response.headers]
    assert ("X-Answer", "yes") in response.headers
    assert "content-length" not in names, "hop-by-hop and length headers are left out"


async def test_a_failing_answer_is_carried_by_the_nack(answering_target) -> None:
    answer, url = answering_target
    answer["status"] = 500
    outcome = await deliver(url, reply_wanted=True)
    assert isinstance(outcome, agent_models.Nack) and outcome.reason == "HTTP 500"
    assert outcome.response is not None and outcome.response.status == 500


async def test_an_answer_over_the_cap_is_left_out_and_flagged(answering_target) -> None:
    answer, url = answering_target
    answer["body"] = b"z" * (http.MAX_REPLY_BODY_BYTES + 1)
    outcome = await deliver(url, reply_wanted=True)
    assert isinstance(outcome, agent_models.Ack) and outcome.response is not None
    assert (outcome.response.body, outcome.response.body_too_large) == (b"", True)
    answer["body"] = b"z" * http.MAX_REPLY_BODY_BYTES
    outcome = await deliver(url, reply_wanted=True)
    assert isinstance(outcome, agent_models.Ack) and outcome.response is not None
    assert len(outcome.response.body) == http.MAX_REPLY_BODY_BYTES, "exactly the cap fits"
    assert http.MAX_REPLY_BODY_BYTES == answers.MAX_REPLY_BODY_BYTES, "agent and server agree"
