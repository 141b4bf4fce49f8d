"""Answers relayed between replicas for callers held in wait mode, on a real database
(both engines): sealed at rest, taken once, the first answer wins, expired ones cleaned."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa

from relay_server import models
from relay_server.dispatch import wait_relay
from relay_server.ingress import answers, waiting
from relay_server.store import tables
from tests.integration.conftest import Installation
from tests.integration.test_store import incoming, lease

SECRET_BODY = b"card 4242 4242 4242 4242 accepted"


async def test_an_answer_left_for_another_replica_is_sealed_and_taken_once(
    installed: Installation,
) -> None:
    store = installed.store
    answer = answers.Answer(status=201, headers=(("X-Order", "7"),), body=SECRET_BODY)
    later = models.now_ms() + 60_000
    await store.put_wait_reply("evt-1", wait_relay.encode(answer), expires_at=later)
    other = answers.Answer(status=500, body=b"second answer")
    await store.put_wait_reply("evt-1", wait_relay.encode(other), expires_at=later)

    async with store.db.read() as conn:
        (sealed,) = (await conn.execute(sa.select(tables.wait_replies.c.answer_sealed))).scalars()
    assert SECRET_BODY not in sealed and b"X-Order" not in sealed, "no plaintext at rest"

    taken = await store.take_wait_replies(["evt-1", "evt-unknown"])
    assert list(taken) == ["evt-1"]
    assert wait_relay.decode(taken["evt-1"]) == answer, "the first answer wins"
    assert await store.take_wait_replies(["evt-1"]) == {}, "taken once"


async def test_answers_whose_caller_is_gone_are_cleaned(installed: Installation) -> None:
    store = installed.store
    gone = wait_relay.encode(answers.ACCEPTED)
    await store.put_wait_reply("evt-old", gone, expires_at=models.now_ms() - 1)
    await store.put_wait_reply("evt-new", gone, expires_at=models.now_ms() + 60_000)
    removed = await store.clean()
    assert removed["wait_replies"] == 1
    assert list(await store.take_wait_replies(["evt-old", "evt-new"])) == ["evt-new"]


async def test_a_lease_says_until_when_its_caller_waits(installed: Installation) -> None:
    store = installed.store
    until = models.now_ms() + 30_000
    await store.ingest(dataclasses.replace(incoming(installed, b"{}"), caller_waits_until=until))
    await store.ingest(incoming(installed, b"{}"))
    leases = await lease(store, installed)
    assert sorted(item.caller_waits_until or 0 for item in leases) == [0, until]
    relay = wait_relay.ReplyRelay(store, waiting.Waiting())
    assert [relay.wants(item) for item in leases].count(True) == 1
