"""The storage contract on a real SQLite file: the state machine, fencing, group commit."""

from __future__ import annotations

import asyncio
import datetime as dt

from relay_server import ids, models
from relay_server.store import events, sql
from tests.integration.conftest import Installation


def incoming(
    inst: Installation,
    body: bytes = b"{}",
    *,
    route: models.Route | None = None,
    received_at: dt.datetime | None = None,
) -> models.IncomingEvent:
    return models.IncomingEvent(
        id=ids.new_id(),
        route=route or inst.route,
        method="POST",
        path="/p",
        query="a=1",
        headers=(("X-A", "1"), ("X-A", "2")),
        body=body,
        received_at=received_at or dt.datetime.now(dt.UTC),
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

    assert len(await store.replay_dead(events.DeadFilter(account_id=account.id))) == 1
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


async def _kill(
    store: sql.SqlStore, route: models.Route, reason: str, *, hours_ago: int = 0
) -> models.IncomingEvent:
    """Ingest one event on `route` and reject its delivery with `reason`."""
    when = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours_ago)
    event = models.IncomingEvent(
        id=ids.new_id(),
        route=route,
        method="POST",
        path="/",
        query="",
        headers=(),
        body=reason.encode(),
        received_at=when,
        source="127.0.0.1",
    )
    await store.ingest(event)
    (held,) = await store.lease(route.output_ids, limit=1, lease_ms=30_000, holder="t")
    await store.settle([settle(held, models.Outcome.REJECT, reason=reason)], agent="a")
    return event


async def test_the_dlq_filters_by_bucket_input_age_and_error_and_replays_only_matches(
    installed: Installation,
) -> None:
    store, account = installed.store, installed.account
    other_input = await store.create_input(installed.bucket, "second")
    other_bucket = await store.create_bucket(
        account.id,
        "billing",
        models.BucketPolicy(max_attempts=2, max_age_ms=3_600_000, retention_ms=86_400_000),
    )
    billing_input = await store.create_input(other_bucket, "main")
    second, billing = await store.route(other_input.id), await store.route(billing_input.id)
    assert second is not None and billing is not None
    old = await _kill(store, installed.route, "Timeout 100%_done", hours_ago=3)
    fresh = await _kill(store, second, "HTTP 500")
    paid = await _kill(store, billing, "http 502")
    waiting = incoming(installed)  # pending, never in the DLQ
    await store.ingest(waiting)

    async def listed(**filters: object) -> set[str]:
        where = events.DeadFilter(account_id=account.id, **filters)  # type: ignore[arg-type]
        return {e.id for e in await store.list_dead(where)}

    hour_ago = models.now_ms() - 3_600_000
    assert await listed() == {old.id, fresh.id, paid.id}
    assert await listed(bucket_id=installed.bucket.id) == {old.id, fresh.id}
    assert await listed(input_id=other_input.id) == {fresh.id}
    assert await listed(received_before_ms=hour_ago) == {old.id}
    assert await listed(received_after_ms=hour_ago) == {fresh.id, paid.id}
    assert await listed(error="HTTP 50") == {fresh.id, paid.id}
    assert await listed(error="100%_") == {old.id}, "LIKE wildcards are matched literally"
    assert await listed(error="100%x") == set()
    assert await listed(bucket_id=other_bucket.id, error="timeout") == set()
    assert await listed(limit=1) == {paid.id}, "newest first"

    where = events.DeadFilter(account_id=account.id, error="http", received_after_ms=hour_ago)
    assert {event for _, event, _ in await store.dead_deliveries(where)} == {fresh.id, paid.id}
    assert len(await store.replay_dead(where)) == 2
    assert await listed() == {old.id}
    assert await store.replay_dead(where) == []
    leased = await store.lease(
        [*second.output_ids, *billing.output_ids], limit=10, lease_ms=1, holder="t"
    )
    assert sorted(item.event_id for item in leased if item.replay) == sorted([fresh.id, paid.id])
    assert [item.event_id for item in leased if not item.replay] == [waiting.id]


async def test_status_counts_the_account_and_measures_the_sqlite_files(
    installed: Installation, engine: str
) -> None:
    store = installed.store
    await _kill(store, installed.route, "bad")
    await store.ingest(incoming(installed, received_at=dt.datetime.now(dt.UTC)))
    found = await store.status(installed.account.id)
    assert found.deliveries == {"pending": 1, "leased": 0, "delivered": 0, "dead": 1}
    assert found.schema_revision
    assert found.oldest_pending_ms is not None
    assert found.oldest_pending_ms <= models.now_ms()
    if engine == "postgres":
        assert found.database_url.startswith("postgresql+asyncpg://postgres@127.0.0.1")
        assert found.database_files == {}, "PostgreSQL's files are the server's business"
        return
    assert found.database_url.startswith("sqlite:///")
    main = [path for path in found.database_files if path.endswith(".db")]
    assert len(main) == 1 and found.database_files[main[0]] > 0
