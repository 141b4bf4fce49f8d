"""The ingress route cache on a real store: one lookup per input however many webhooks
miss at once, failures shared and not remembered, a caller leaving does not stop the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay_server import crypto, errors, models
from relay_server.ingress import routes
from relay_server.store import database, sql
from tests.integration.conftest import Installation, install


class CountingStore(sql.SqlStore):
    """A real SqlStore that counts its route lookups."""

    lookups = 0

    async def route(self, input_id: str) -> models.Route | None:
        self.lookups += 1
        return await super().route(input_id)


@pytest.fixture
async def counted(database_url: str, keyring: crypto.KeyRing) -> AsyncIterator[CountingStore]:
    store = CountingStore(database.DatabaseSettings(url=database_url), keyring)
    await store.migrate()
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def installation(counted: CountingStore) -> Installation:
    installation = await install(counted)
    counted.lookups = 0
    return installation


async def test_concurrent_misses_share_one_lookup(
    counted: CountingStore, installation: Installation
) -> None:
    cache = routes.RouteCache(counted, ttl_s=60)
    input_id = installation.route.input.id

    found = await asyncio.gather(*(cache.get(input_id) for _ in range(50)))

    assert counted.lookups == 1
    assert {route.input.id for route in found if route is not None} == {input_id}
    assert await cache.get(input_id) == found[0]  # and it is remembered
    assert counted.lookups == 1


async def test_an_expired_entry_is_looked_up_again(
    counted: CountingStore, installation: Installation
) -> None:
    cache = routes.RouteCache(counted, ttl_s=0.05)
    input_id = installation.route.input.id
    await cache.get(input_id)
    await asyncio.sleep(0.1)

    await asyncio.gather(*(cache.get(input_id) for _ in range(10)))

    assert counted.lookups == 2


async def test_unknown_and_malformed_ids(
    counted: CountingStore, installation: Installation
) -> None:
    cache = routes.RouteCache(counted, ttl_s=60)
    unknown = "01a20a18-4713-77ff-b2d3-abc11487d2c0"

    assert await cache.get("not-a-uuid") is None
    assert counted.lookups == 0  # never asks the database about a malformed id
    assert await asyncio.gather(*(cache.get(unknown) for _ in range(5))) == [None] * 5
    assert await cache.get(unknown) is None
    assert counted.lookups == 1  # unknown ids are remembered too


async def test_a_failed_lookup_fails_every_waiter_and_is_not_remembered(
    database_url: str, keyring: crypto.KeyRing, installation: Installation
) -> None:
    closed = CountingStore(database.DatabaseSettings(url=database_url), keyring)
    await closed.open()
    await closed.close()  # every query now fails with StorageUnavailable
    cache = routes.RouteCache(closed, ttl_s=60)
    input_id = installation.route.input.id

    outcomes = await asyncio.gather(
        *(cache.get(input_id) for _ in range(5)), return_exceptions=True
    )

    assert all(isinstance(outcome, errors.StorageError) for outcome in outcomes), outcomes
    assert closed.lookups == 1
    with pytest.raises(errors.StorageError):
        await cache.get(input_id)
    assert closed.lookups == 2  # the failure was not cached


async def test_a_caller_that_leaves_does_not_cancel_the_others(
    counted: CountingStore, installation: Installation
) -> None:
    cache = routes.RouteCache(counted, ttl_s=60)
    input_id = installation.route.input.id
    leaving = asyncio.create_task(cache.get(input_id))
    staying = asyncio.create_task(cache.get(input_id))
    await asyncio.sleep(0)  # both are waiting on the one lookup
    leaving.cancel()

    route = await staying

    assert route is not None and route.input.id == input_id
    assert leaving.cancelled()
    assert counted.lookups == 1
