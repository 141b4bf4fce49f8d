"""Bucket policies on a real database: dedup, retention, ordered and added outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import aiohttp
import pytest
import sqlalchemy as sa

from relay_server import crypto, errors, models
from relay_server.ingress.app import DUPLICATE_HEADER
from relay_server.store import sql, tables
from tests.integration.conftest import Installation, Running, opened_store
from tests.integration.test_store import incoming, lease, settle


async def with_policy(inst: Installation, **changes: object) -> models.Route:
    """Apply policy changes to the test bucket; returns the input's fresh route."""
    bucket = await inst.store.get_bucket(inst.account.id, inst.bucket.name)
    await inst.store.update_bucket(bucket, dataclasses.replace(bucket.policy, **changes))  # type: ignore[arg-type]
    route = await inst.store.route(inst.route.input.id)
    assert route is not None
    return route


def with_headers(
    inst: Installation, route: models.Route, *headers: tuple[str, str], body: bytes = b"{}"
) -> models.IncomingEvent:
    return dataclasses.replace(incoming(inst, body, route=route), headers=headers)


async def stored_event_ids(store: sql.SqlStore) -> list[str]:
    async with store.db.read() as conn:
        return list((await conn.execute(sa.select(tables.events.c.id))).scalars())


# ---- dedup -----------------------------------------------------------------------------


async def test_concurrent_duplicates_make_one_event_and_name_it(installed: Installation) -> None:
    store, route = installed.store, installed.route
    copies = [with_headers(installed, route, ("X-Provider-Event-Id", "evt_1")) for _ in range(20)]
    answers = await asyncio.gather(*(store.ingest(event) for event in copies))
    (stored,) = await stored_event_ids(store)
    assert answers.count(None) == 1, "exactly one of 20 concurrent copies is stored"
    assert [a for a in answers if a is not None] == [stored] * 19, (
        "the other 19 are answered with the stored event's id"
    )
    assert len(await lease(store, installed)) == 1


async def test_duplicates_racing_from_two_servers_make_one_event(
    installed: Installation, database_url: str, keyring: crypto.KeyRing
) -> None:
    """Two stores on one database, as two replicas are: each copy is its own transaction
    (one store would group concurrent copies into one), and the database decides."""
    route = installed.route
    async with opened_store(database_url, keyring) as other:
        for n in range(10):
            key = ("X-Provider-Event-Id", f"evt_{n}")
            first, second = (with_headers(installed, route, key) for _ in range(2))
            answers = await asyncio.gather(installed.store.ingest(first), other.ingest(second))
            assert answers in ([None, first.id], [second.id, None]), f"round {n}: {answers}"
    assert len(await stored_event_ids(installed.store)) == 10


async def test_dedup_header_names_are_case_insensitive_and_values_exact(
    installed: Installation,
) -> None:
    store, route = installed.store, installed.route
    first = with_headers(installed, route, ("x-provider-event-id", "A"))
    assert await store.ingest(first) is None
    assert await store.ingest(with_headers(installed, route, ("X-PROVIDER-EVENT-ID", "A"))) == (
        first.id
    )
    assert await store.ingest(with_headers(installed, route, ("X-Provider-Event-Id", "a"))) is None
    assert await store.ingest(with_headers(installed, route)) is None, "no id: never a duplicate"
    assert len(await stored_event_ids(store)) == 3


async def test_after_the_window_the_same_id_is_a_new_event(installed: Installation) -> None:
    route = await with_policy(installed, dedup_window_ms=200)
    first = with_headers(installed, route, ("X-Provider-Event-Id", "same"))
    assert await installed.store.ingest(first) is None
    assert await installed.store.ingest(
        with_headers(installed, route, ("X-Provider-Event-Id", "same"))
    ) == (first.id)
    await asyncio.sleep(0.3)
    assert (
        await installed.store.ingest(
            with_headers(installed, route, ("X-Provider-Event-Id", "same"))
        )
        is None
    ), "the window has passed: the repeat is stored"
    assert len(await stored_event_ids(installed.store)) == 2


async def test_presets_and_off(installed: Installation) -> None:
    github = models.DEDUP_PRESETS["github"]
    route = await with_policy(installed, dedup_headers=(github,))
    store = installed.store
    first = with_headers(installed, route, (github, "d-1"), ("X-Provider-Event-Id", "p"))
    assert await store.ingest(first) is None
    assert await store.ingest(with_headers(installed, route, (github, "d-1"))) == first.id
    assert await store.ingest(with_headers(installed, route, ("X-Provider-Event-Id", "p"))) is None
    route = await with_policy(installed, dedup_headers=())
    assert await store.ingest(with_headers(installed, route, (github, "d-1"))) is None
    assert len(await stored_event_ids(store)) == 3


async def test_a_duplicate_webhook_is_answered_200_naming_the_original(
    running_server: Running,
) -> None:
    running = running_server
    url = f"http://127.0.0.1:{running.relay.http_port}/in/{running.installation.route.input.id}"
    headers = {"X-Provider-Event-Id": "ch_123"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"first", headers=headers) as first:
            assert first.status == 200
            assert DUPLICATE_HEADER not in first.headers
        answers = []
        for _ in range(3):
            async with session.post(url, data=b"retry", headers=headers) as again:
                answers.append((again.status, again.headers.get(DUPLICATE_HEADER)))
    (stored,) = await stored_event_ids(running.relay.store)
    assert answers == [(200, stored)] * 3


# ---- retention -------------------------------------------------------------------------


async def aged(inst: Installation, route: models.Route, age: dt.timedelta) -> str:
    event = incoming(inst, route=route, received_at=dt.datetime.now(dt.UTC) - age)
    await inst.store.ingest(event)
    return event.id


async def test_the_cleaner_keeps_pending_leased_and_young_dead_but_drops_the_rest(
    installed: Installation,
) -> None:
    store = installed.store
    route = await with_policy(installed, retention_ms=60_000)
    old = dt.timedelta(minutes=5)
    delivered, dead, leased, pending = [await aged(installed, route, old) for _ in range(4)]
    young = await aged(installed, route, dt.timedelta(seconds=1))
    leases = {item.event_id: item for item in await lease(store, installed, limit=3)}
    await store.settle(
        [
            settle(leases[delivered], models.Outcome.ACK),
            settle(leases[dead], models.Outcome.REJECT, reason="poison"),
        ],
        agent="t",
    )
    assert leased in leases and pending not in leases
    removed = await store.clean()
    assert removed["events"] == 1
    assert set(await stored_event_ids(store)) == {dead, leased, pending, young}, (
        "only the old delivered event goes: pending and leased ones are never deleted, "
        "a dead one stays for the DLQ retention"
    )
    await with_policy(installed, retention_ms=60_000, dlq_retention_ms=1)
    await asyncio.sleep(0.01)
    removed = await store.clean()
    assert (removed["dead_letters"], removed["events"]) == (1, 1)
    assert set(await stored_event_ids(store)) == {leased, pending, young}


async def test_the_cleaner_works_in_small_batches_and_forgets_dedup_keys(
    installed: Installation,
) -> None:
    store = installed.store
    route = await with_policy(installed, retention_ms=1000, dedup_window_ms=1)
    ids = [await aged(installed, route, dt.timedelta(minutes=1)) for _ in range(7)]
    await store.ingest(with_headers(installed, route, ("X-Provider-Event-Id", "k")))
    for item in await lease(store, installed, limit=100):
        await store.settle([settle(item, models.Outcome.ACK)], agent="t")
    await asyncio.sleep(0.01)
    removed = await store.clean(limit=3)
    assert removed == {
        "dedup_keys": 1,
        "nonces": 0,
        "wait_replies": 0,
        "dead_letters": 0,
        "events": 7,
        "body_files": 0,
    }
    remaining = await stored_event_ids(store)
    assert not set(ids) & set(remaining) and len(remaining) == 1
    async with store.db.read() as conn:
        attempts = await conn.scalar(sa.select(sa.func.count()).select_from(tables.attempts))
    assert attempts == 1, "the deleted events' attempts went with them"


# ---- outputs ---------------------------------------------------------------------------


async def ordered_bucket(inst: Installation) -> tuple[models.Output, models.Route]:
    store = inst.store
    bucket = await store.get_bucket(inst.account.id, inst.bucket.name)
    await store.set_output_ordered(bucket, "default", ordered=True)
    unordered = await store.create_output(bucket, "audit", ordered=False)
    route = await store.route(inst.route.input.id)
    assert route is not None
    return unordered, route


async def test_an_ordered_output_hands_out_its_oldest_unsettled_delivery_only(
    installed: Installation,
) -> None:
    store = installed.store
    audit, route = await ordered_bucket(installed)
    default = next(o for o in route.output_ids if o != audit.id)
    events = [incoming(installed, f"e{n}".encode(), route=route) for n in range(3)]
    for event in events:
        await store.ingest(event)

    async def take(output_id: str) -> list[models.Lease]:
        return await store.lease([output_id], limit=10, lease_ms=30_000, holder="t")

    assert [x.body for x in await take(audit.id)] == [b"e0", b"e1", b"e2"], "unordered: all"
    (head,) = await take(default)
    assert head.body == b"e0"
    assert await take(default) == [], "one in flight at a time"
    await store.settle([settle(head, models.Outcome.ACK)], agent="t")
    (second,) = await take(default)
    assert second.body == b"e1"
    await store.settle(
        [settle(second, models.Outcome.NACK, retry_after_ms=300, reason="busy")], agent="t"
    )
    assert await take(default) == [], "a failing head holds the line while it waits to retry"
    await asyncio.sleep(0.35)
    (retried,) = await take(default)
    assert (retried.body, retried.attempt) == (b"e1", 2), "the same event again, not the next"
    await store.settle([settle(retried, models.Outcome.REJECT, reason="poison")], agent="t")
    (third,) = await take(default)
    assert third.body == b"e2", "a dead-lettered event does not block the next"


async def test_a_new_output_gets_new_events_and_a_bucket_keeps_one(
    installed: Installation,
) -> None:
    store = installed.store
    before = incoming(installed)
    await store.ingest(before)
    bucket = await store.get_bucket(installed.account.id, installed.bucket.name)
    added = await store.create_output(bucket, "archive", ordered=False)
    after = incoming(installed)  # the cached route does not know the new output yet
    await store.ingest(after)
    got = await store.lease([added.id], limit=10, lease_ms=30_000, holder="t")
    assert [x.event_id for x in got] == [after.id]
    with pytest.raises(errors.Conflict, match="undelivered"):
        await store.delete_output(bucket, "archive", force=False)
    await store.delete_output(bucket, "archive", force=True)
    with pytest.raises(errors.Conflict, match="last one"):
        await store.delete_output(bucket, "default", force=True)
    assert [o.name for o in await store.list_outputs(bucket)] == ["default"]


async def test_a_claim_over_several_outputs_takes_the_oldest_of_all(
    installed: Installation,
) -> None:
    """Each output is read in its own index order, then merged: oldest first overall."""
    store = installed.store
    bucket = await store.get_bucket(installed.account.id, installed.bucket.name)
    archive = await store.create_output(bucket, "archive", ordered=False)
    route = await store.route(installed.route.input.id)
    assert route is not None
    default = next(o for o in route.output_ids if o != archive.id)
    for n in range(4):
        await store.ingest(incoming(installed, f"e{n}".encode(), route=route))
        await asyncio.sleep(0.003)  # distinct arrival (available) times
    # The default output's first two are taken alone: archive's e0 and e1 are the oldest now.
    await store.lease([default], limit=2, lease_ms=30_000, holder="t")
    taken = await store.lease(route.output_ids, limit=3, lease_ms=30_000, holder="t")
    got = sorted((item.body, item.output) for item in taken)
    # e2's two deliveries are equally old: either may come third.
    assert got[:2] == [(b"e0", "archive"), (b"e1", "archive")], got
    assert got[2][0] == b"e2", got
