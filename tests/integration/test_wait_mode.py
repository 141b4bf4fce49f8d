"""Response mode "wait" end to end in one process: a RelayServer, the SDK Consumer, HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp

import relay_agent
from relay_server import models
from tests.integration.conftest import Running
from tests.integration.test_agent_relay import agent_settings

WAIT = models.ResponseMode(kind=models.ResponseKind.WAIT, timeout_ms=10_000)


async def post(running: Running, body: bytes) -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{running.relay.http_port}/in/{running.installation.route.input.id}"
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def answered_by(
    running: Running, handle: Callable[[relay_agent.Event], Awaitable[None]]
) -> tuple[int, dict[str, str], bytes]:
    """POST a webhook while an SDK worker settles it with `handle`; the sender's answer."""
    await running.relay.store.set_response(running.installation.route.input.id, WAIT)
    settings = agent_settings(running.relay.grpc_port or 0, token=running.installation.token)
    async with relay_agent.Consumer(settings) as events:
        sender = asyncio.create_task(post(running, b"ping"))
        event = await asyncio.wait_for(anext(events), 10)
        assert event.reply_wanted, "the server asks for the answer: a sender waits"
        await handle(event)
        return await asyncio.wait_for(sender, 10)


async def test_an_sdk_reply_reaches_the_waiting_sender(running_server: Running) -> None:
    async def reply(event: relay_agent.Event) -> None:
        await event.reply(201, [("X-Handled-By", "sdk")], b"pong " + event.body)

    status, headers, body = await answered_by(running_server, reply)
    assert (status, headers["X-Handled-By"], body) == (201, "sdk", b"pong ping")


async def test_a_plain_ack_answers_200_empty(running_server: Running) -> None:
    async def ack(event: relay_agent.Event) -> None:
        await event.ack()

    status, _, body = await answered_by(running_server, ack)
    assert (status, body) == (200, b"")


async def test_nobody_waits_for_an_accept_input(running_server: Running) -> None:
    settings = agent_settings(
        running_server.relay.grpc_port or 0, token=running_server.installation.token
    )
    async with relay_agent.Consumer(settings) as events:
        assert (await post(running_server, b"x"))[0] == 200
        event = await asyncio.wait_for(anext(events), 10)
        assert not event.reply_wanted
        await event.ack()
    assert running_server.relay.hub.waiting.count == 0
