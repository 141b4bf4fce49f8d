"""Hand-off at ingest: a delivery written LEASED to an agent with a free place, on both engines.

What the agent sees: the same lease a claim would have given (attempt 1, the event as
received), with no claim; what the queue shows: the delivery leased to that agent, so no
other agent or replica can take it, and settling it works like any lease.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from relay_server import errors, models, settings
from relay_server.dispatch import hub as hub_mod
from relay_server.dispatch import session
from relay_server.store import tables
from tests.integration.conftest import Installation
from tests.integration.test_store import incoming, lease, settle
from tests.integration.test_store_policies import ordered_bucket, with_headers, with_policy


class Places:
    """A stand-in agent window: hands out places, records what it was given or returned."""

    def __init__(self, free: int = 10) -> None:
        self.free = free
        self.given: list[models.Lease] = []
        self.cancelled = 0

    def offer(self, output_id: str) -> models.Slot | None:
        if self.free == 0:
            return None
        self.free -= 1
        return models.Slot(
            holder="key/agent-a",
            lease_ms=30_000,
            bucket="orders",
            output="default",
            give=self.given.append,
            cancel=self._cancel,
        )

    def _cancel(self) -> None:
        self.cancelled += 1
        self.free += 1


async def delivery_rows(inst: Installation) -> list[sa.Row[tuple[object, ...]]]:
    D = tables.deliveries
    async with inst.store.db.read() as conn:
        query = sa.select(D.c.state, D.c.attempts, D.c.leased_by, D.c.first_attempt_at)
        return list((await conn.execute(query)).all())


async def test_a_new_event_is_given_to_the_agent_with_a_place_and_leased_to_it(
    installed: Installation,
) -> None:
    store, places = installed.store, Places()
    event = incoming(installed, b'{"order": 1}')

    assert await store.ingest(event, places.offer) is None

    (given,) = places.given
    assert (given.event_id, given.body, given.headers, given.query, given.attempt) == (
        event.id,
        b'{"order": 1}',
        event.headers,
        "a=1",
        1,
    )
    assert (given.bucket, given.output) == ("orders", "default")
    ((state, attempts, holder, first_attempt),) = await delivery_rows(installed)
    assert (state, attempts, holder) == ("leased", 1, "key/agent-a") and first_attempt
    assert await lease(store, installed) == [], "nobody else can claim it"
    assert await store.settle([settle(given, models.Outcome.ACK)], agent="key/agent-a") == []
    assert [row.state for row in await delivery_rows(installed)] == ["delivered"]


async def test_events_committed_together_some_given_some_pending_are_all_stored(
    installed: Installation,
) -> None:
    """One group commit carries deliveries leased at ingest and PENDING ones side by side
    (it once failed the whole group with 503s when they did)."""
    store, places = installed.store, Places(free=3)
    events = [incoming(installed, f"event {n}".encode()) for n in range(12)]

    results = await asyncio.gather(*(store.ingest(e, places.offer) for e in events))

    assert results == [None] * 12
    assert len(places.given) == 3 and places.cancelled == 0
    states = sorted(row.state for row in await delivery_rows(installed))
    assert states == ["leased"] * 3 + ["pending"] * 9
    claimed = await lease(store, installed, limit=20)
    assert {c.event_id for c in claimed} | {g.event_id for g in places.given} == {
        e.id for e in events
    }


async def test_a_given_lease_nacked_is_retried_like_any_other(installed: Installation) -> None:
    store, places = installed.store, Places()
    await store.ingest(incoming(installed), places.offer)
    (given,) = places.given
    nack = settle(given, models.Outcome.NACK, retry_after_ms=0, reason="HTTP 500")
    assert await store.settle([nack], agent="key/agent-a") == []
    (again,) = await lease(store, installed)
    assert (again.event_id, again.attempt) == (given.event_id, 2)


async def test_without_a_place_the_event_waits_pending(installed: Installation) -> None:
    store, places = installed.store, Places(free=0)
    event = incoming(installed)
    await store.ingest(event, places.offer)
    assert places.given == []
    (claimed,) = await lease(store, installed)
    assert claimed.event_id == event.id


async def test_a_duplicate_returns_its_place_and_leases_nothing(installed: Installation) -> None:
    store, places = installed.store, Places()
    route = await with_policy(installed, dedup_headers=("X-Id",))
    first = with_headers(installed, route, ("X-Id", "same"))
    again = with_headers(installed, route, ("X-Id", "same"))
    await store.ingest(first, places.offer)
    assert await store.ingest(again, places.offer) == first.id
    assert (len(places.given), places.cancelled) == (1, 1)
    assert len(await delivery_rows(installed)) == 1


async def test_an_ordered_output_is_never_given_past_its_head(installed: Installation) -> None:
    """Ordered outputs go through the claim, which hands out the head only."""
    store, places = installed.store, Places()
    unordered, route = await ordered_bucket(installed)
    await store.ingest(incoming(installed, route=route), places.offer)
    await store.ingest(incoming(installed, route=route), places.offer)
    assert (len(places.given), places.cancelled) == (2, 2), "given on the unordered output only"
    ordered = next(o for o in route.output_ids if o != unordered.id)
    taken = await store.lease([ordered], limit=10, lease_ms=30_000, holder="t")
    assert len(taken) == 1, "the ordered output gives its head only"


async def test_a_failed_write_returns_the_place(
    installed: Installation, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, places = installed.store, Places()

    async def unavailable(*args: object, **kwargs: object) -> object:
        raise errors.StorageUnavailable("database is gone")

    monkeypatch.setattr(store.db, "write_coalesced", unavailable)
    with pytest.raises(errors.StorageUnavailable):
        await store.ingest(incoming(installed), places.offer)
    assert (places.given, places.cancelled, places.free) == ([], 1, 10)


async def test_a_lease_given_after_its_stream_ended_goes_back_to_the_queue(
    installed: Installation,
) -> None:
    """The agent disconnects while its event commits: the event is not stuck until the
    lease runs out; the next agent gets it at once (the lost attempt is counted)."""
    store = installed.store
    hub = hub_mod.Hub()
    agent = session.AgentSession(
        session_id="s1",
        agent="key/agent-a",
        store=store,
        hub=hub,
        outputs={"orders": installed.route.output_ids[0]},
        credit=4,
        settings=settings.DispatchSettings(),
    )
    assert agent.offer(installed.route.output_ids[0]) is None, "not caught up before a claim"
    agent._caught_up = True  # as after a claim that found no backlog
    slot = agent.offer(installed.route.output_ids[0])
    assert slot is not None and agent.offer(installed.route.output_ids[0]) is not None
    agent._closed = True  # the stream ends while the event is being committed

    event = incoming(installed)
    await store.ingest(event, lambda output_id: slot)

    for _ in range(100):
        if (taken := await lease(store, installed)) != []:
            break
        await asyncio.sleep(0.02)
    assert [(item.event_id, item.attempt) for item in taken] == [(event.id, 2)]
    assert agent.held == {}


async def test_a_lease_given_after_the_agent_lowered_its_credit_is_not_pushed(
    installed: Installation,
) -> None:
    """Credit{0} promises the agent no more leases: one committed meanwhile goes back."""
    store = installed.store
    output_id = installed.route.output_ids[0]
    agent = session.AgentSession(
        session_id="s1",
        agent="key/agent-a",
        store=store,
        hub=hub_mod.Hub(),
        outputs={"orders": output_id},
        credit=4,
        settings=settings.DispatchSettings(),
    )
    agent._caught_up = True
    slot = agent.offer(output_id)
    agent.credit = 0  # a Credit{0} frame read while the event commits

    event = incoming(installed)
    await store.ingest(event, lambda _: slot)

    assert agent.held == {} and agent._handed == []
    for _ in range(100):
        if (taken := await lease(store, installed)) != []:
            break
        await asyncio.sleep(0.02)
    assert [(item.event_id, item.attempt) for item in taken] == [(event.id, 2)]
