"""The storage contract on a real SQLite file: the state machine, fencing, group commit."""

from __future__ import annotations

import asyncio
import datetime as dt

from relay_server import ids, models
from relay_server.store import events, sql
from tests.integration.conftest import Installation


def incoming(inst: Installation, body: bytes = b"{}") -> models.IncomingEvent:
    return models.IncomingEvent(
        id=ids.new_id(),
        route=inst.route,
        method="POST",
        path="/p",
        query="a=1",
        headers=(("X-A", "1"), ("X-A", "2")),
        body=body,
        received_at=dt.datetime.now(dt.UTC),
        source="127.0.0.1",
    )


def settle(lease: models.Lease, outcome: models.Outcome, **kw: object) -> models.Settlement:
    return models.Settlement(lease_id=lease.lease_id, outcome=outcome, **kw)  # type: ignore[arg-type]


async def lease(store: sql.SqlStore, inst: Installation, limit: int = 10) -> list[models.Lease]:
    return await store.lease(inst.route.output_ids, limit=limit, lease_ms=30_000, holder="t")


async def test_concurrent_ingests_are_all_committed_in_groups(installed: Installation) -> None:
    store = installed.store
    bodies = [f"event {n}".encode() for n in range(500)]
    await asyncio.gather(*(store.ingest(incoming(installed, b)) for b in bodies))
    leased = await lease(store, installed, limit=1000)
    assert sorted(item.body for item in leased) == sorted(bodies)


async def test_a_lease_carries_the_event_as_received(installed: Installation) -> None:
    event = incoming(installed, bytes(range(256)))
    await installed.store.ingest(event)
    (got,) = await lease(installed.store, installed)
    assert (got.event_id, got.body, got.headers, got.query, got.path, got.attempt) == (
        event.id,
        event.body,
        event.headers,
        "a=1",
        "/p",
        1,
    )
    assert got.bucket == "orders" and got.output == "default"


async def test_oldest_first_and_no_delivery_is_leased_twice(installed: Installation) -> None:
    store = installed.store
    for n in range(40):
        await store.ingest(incoming(installed, f"{n}".encode()))
    batches = await asyncio.gather(*(lease(store, installed, limit=7) for _ in range(8)))
    leased = [item for batch in batches for item in batch]
    assert len(leased) == 40
    assert len({item.delivery_id for item in leased}) == 40
    first = batches[0]
    assert [item.body for item in first] == sorted((i.body for i in first), key=int)


async def test_an_ack_for_an_old_lease_never_settles_a_newer_attempt(
    installed: Installation,
) -> None:
    store = installed.store
    await store.ingest(incoming(installed))
    (first,) = await lease(store, installed)
    assert (
        await store.settle([settle(first, models.Outcome.NACK, retry_after_ms=0)], agent="a") == []
    )
    (second,) = await lease(store, installed)
    assert second.attempt == 2 and second.delivery_id == first.delivery_id
    lost = await store.settle([settle(first, models.Outcome.ACK)], agent="late")
    assert lost == [first.lease_id]
    assert await store.extend([first.lease_id], 5000) == [first.lease_id]
    assert await store.settle([settle(second, models.Outcome.ACK)], agent="a") == []
    assert await store.settle([settle(second, models.Outcome.ACK)], agent="a") == [second.lease_id]


async def test_nacks_past_max_attempts_end_dead_and_replay_makes_a_fresh_delivery(
    installed: Installation,
) -> None:
    store, account = installed.store, installed.account
    event = incoming(installed)
    await store.ingest(event)
    for attempt in range(1, 6):
        (held,) = await lease(store, installed)
        assert held.attempt == attempt
        await store.settle([settle(held, models.Outcome.NACK, retry_after_ms=0)], agent="a")
    assert await lease(store, installed) == []
    dead = await store.list_events(
        events.EventFilter(account_id=account.id, state=models.DeliveryState.DEAD)
    )
    assert [e.id for e in dead] == [event.id]

    assert len(await store.replay_dead(account.id, None)) == 1
    (again,) = await lease(store, installed)
    assert (again.event_id, again.attempt, again.replay) == (event.id, 1, True)
    assert (
        await store.list_events(
            events.EventFilter(account_id=account.id, state=models.DeliveryState.DEAD)
        )
        == []
    )
    detail = await store.get_event(account.id, event.id)
    assert [a.outcome for a in detail.attempts] == [models.Outcome.NACK] * 5


async def test_a_reject_goes_straight_to_dead(installed: Installation) -> None:
    await installed.store.ingest(incoming(installed))
    (held,) = await lease(installed.store, installed)
    await installed.store.settle(
        [settle(held, models.Outcome.REJECT, reason="bad json")], agent="a"
    )
    detail = await installed.store.get_event(installed.account.id, held.event_id)
    assert detail.summary.deliveries[0].state is models.DeliveryState.DEAD
    assert detail.summary.deliveries[0].last_error == "reject: bad json"


async def test_expired_leases_are_reaped_as_failed_attempts(installed: Installation) -> None:
    store = installed.store
    await store.ingest(incoming(installed))
    (held,) = await store.lease(installed.route.output_ids, limit=1, lease_ms=1, holder="t")
    await asyncio.sleep(0.01)
    assert await store.reap() == [held.lease_id]
    assert await store.reap() == []
    assert await store.settle([settle(held, models.Outcome.ACK)], agent="late") == [held.lease_id]
    await asyncio.sleep(0.6)  # the fast policy's backoff cap
    (again,) = await lease(store, installed)
    assert again.attempt == 2
