"""Ephemeral buckets on a real SQLite file: payloads in memory only, metadata in the rows."""

from __future__ import annotations

import dataclasses
import pathlib
import secrets

import pytest
import sqlalchemy as sa

from relay_server import crypto, errors, models
from relay_server.store import database, ephemeral, events, sql, tables
from tests.integration.conftest import FAST, Installation
from tests.integration.test_store import incoming, lease, settle


async def ephemeral_route(inst: Installation) -> models.Route:
    bucket = await inst.store.get_bucket(inst.account.id, inst.bucket.name)
    await inst.store.update_bucket(bucket, dataclasses.replace(bucket.policy, ephemeral=True))
    route = await inst.store.route(inst.route.input.id)
    assert route is not None and route.bucket.policy.ephemeral
    return route


def canary_event(inst: Installation, route: models.Route) -> tuple[models.IncomingEvent, str]:
    marker = f"canary-{secrets.token_hex(8)}"
    event = dataclasses.replace(
        incoming(inst, marker.encode() + secrets.token_bytes(64), route=route),
        path=f"/{marker}",
        query=f"q={marker}",
        headers=(("X-Canary", marker),),
    )
    return event, marker


async def events_row(store: sql.SqlStore, event_id: str) -> sa.Row[tuple[object, ...]]:
    async with store.db.read() as conn:
        return (
            await conn.execute(sa.select(tables.events).where(tables.events.c.id == event_id))
        ).one()


async def test_the_payload_is_leased_from_memory_and_never_written(
    installed: Installation,
) -> None:
    store = installed.store
    event, marker = canary_event(installed, await ephemeral_route(installed))
    assert await store.ingest(event) is None

    row = await events_row(store, event.id)
    assert row.ephemeral and row.path == "" and row.source == ""
    assert row.size == len(event.body), "metadata stays: size, method, time"
    opened = store.keyring.open(row.body_sealed, f"{event.id}:body".encode())
    assert opened == b"", "the sealed body is an empty value, not the payload"
    for path, data in database_files(store).items():
        assert marker.encode() not in data, f"the canary reached {path}"

    (got,) = await lease(store, installed)
    assert (got.body, got.path, got.query, got.headers) == (
        event.body,
        event.path,
        event.query,
        event.headers,
    ), "the agent gets the whole payload, from memory"
    assert event.id in store.payloads
    await store.settle([settle(got, models.Outcome.ACK)], agent="t")
    assert event.id not in store.payloads and store.payloads.used_bytes == 0, (
        "dropped once every delivery is settled"
    )


async def test_a_retried_delivery_keeps_its_payload_until_it_dies(
    installed: Installation,
) -> None:
    store = installed.store
    event, _ = canary_event(installed, await ephemeral_route(installed))
    await store.ingest(event)
    (first,) = await lease(store, installed)
    await store.settle([settle(first, models.Outcome.NACK, retry_after_ms=1)], agent="t")
    assert event.id in store.payloads, "a NACK leaves the delivery pending"
    (second,) = await lease(store, installed) or [None]
    assert second is not None and second.body == event.body and second.attempt == 2
    await store.settle([settle(second, models.Outcome.REJECT, reason="poison")], agent="t")
    assert event.id not in store.payloads, "dead is settled too"


async def test_after_a_restart_the_lost_payload_dead_letters_with_a_clear_error(
    database_url: str, keyring: crypto.KeyRing, installed: Installation
) -> None:
    event, _ = canary_event(installed, await ephemeral_route(installed))
    await installed.store.ingest(event)
    restarted = sql.SqlStore(database.DatabaseSettings(url=database_url), keyring, retry_base=FAST)
    await restarted.open()
    try:
        assert await lease(restarted, installed) == [], "never handed out empty"
        (summary,) = await restarted.list_events(
            events.EventFilter(account_id=installed.account.id)
        )
        detail = await restarted.get_event(installed.account.id, event.id)
    finally:
        await restarted.close()
    (delivery,) = summary.deliveries
    assert delivery.state is models.DeliveryState.DEAD
    assert delivery.last_error == ephemeral.LOST_ERROR
    assert delivery.last_error.startswith("ephemeral payload lost: server restarted")
    (attempt,) = detail.attempts
    assert (attempt.outcome, attempt.agent) == (models.Outcome.REJECT, "server")


async def test_a_full_memory_refuses_the_webhook_and_stores_nothing(
    installed: Installation,
) -> None:
    store = installed.store
    route = await ephemeral_route(installed)
    store.payloads.max_bytes = 1000
    fits = incoming(installed, b"a" * 500, route=route)
    too_much = incoming(installed, b"b" * 500, route=route)
    assert await store.ingest(fits) is None
    with pytest.raises(errors.StorageError, match="memory for ephemeral payloads is full"):
        await store.ingest(too_much)
    assert [e.id for e in await store.list_events(_all(installed))] == [fits.id]
    assert too_much.id not in store.payloads


async def test_a_duplicate_gives_its_memory_back(installed: Installation) -> None:
    store = installed.store
    route = await ephemeral_route(installed)
    first, again = (
        dataclasses.replace(
            incoming(installed, b"same", route=route), headers=(("X-Provider-Event-Id", "e1"),)
        )
        for _ in range(2)
    )
    assert await store.ingest(first) is None
    used = store.payloads.used_bytes
    assert await store.ingest(again) == first.id
    assert store.payloads.used_bytes == used and again.id not in store.payloads


def _all(inst: Installation) -> events.EventFilter:
    return events.EventFilter(account_id=inst.account.id)


def database_files(store: sql.SqlStore) -> dict[str, bytes]:
    return {path: pathlib.Path(path).read_bytes() for path in store.database_files()}
