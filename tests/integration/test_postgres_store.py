"""What only PostgreSQL has: a server that goes away and comes back, and its URL forms.

The rest of the storage contract runs on both engines (the `engine` parameter, see
conftest.py); these tests need a PostgreSQL server to cut off.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import crypto, errors
from relay_server.store import database
from tests import pg
from tests.integration.conftest import install, opened_store
from tests.integration.test_store import incoming

pytestmark = pytest.mark.skipif(not pg.pg_available(), reason=pg.SKIP_REASON)


async def cut_off(url: str, *, allowed: bool) -> None:
    """Refuse (or allow again) new connections to the database and end the open ones,
    as a restart or a failover does from the relay's side."""
    name = pg.database_name(url)
    await pg.admin_execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
    if not allowed:
        await pg.admin_execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        )


@pytest.mark.parametrize("engine", ["postgres"])
async def test_an_unreachable_database_is_storage_unavailable_until_it_is_back(
    database_url: str, keyring: crypto.KeyRing
) -> None:
    async with opened_store(database_url, keyring) as store:
        installation = await install(store)
        assert await store.ingest(incoming(installation)) is None
        await cut_off(database_url, allowed=False)
        try:
            with pytest.raises(errors.StorageUnavailable):  # ingress answers 503 on this
                await store.ingest(incoming(installation))
            with pytest.raises(errors.StorageUnavailable):
                await store.status(installation.account.id)
            with pytest.raises(errors.StorageUnavailable):  # /readyz
                await store.db.probe_write()
        finally:
            await cut_off(database_url, allowed=True)
        assert await store.ingest(incoming(installation)) is None, "back without a restart"
        found = await store.status(installation.account.id)
    assert found.deliveries["pending"] == 2, "the refused one is not stored"


@pytest.mark.parametrize("engine", ["postgres"])
@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+asyncpg", "postgresql+psycopg"])
async def test_every_postgresql_url_form_reaches_the_same_database(
    database_url: str, keyring: crypto.KeyRing, scheme: str
) -> None:
    url = pg.url_for(pg.database_name(database_url), scheme)
    assert database.DatabaseSettings(url=url).async_url.startswith("postgresql+asyncpg://")
    async with opened_store(url, keyring) as store:
        account = await store.create_account("by-url")
    async with opened_store(database_url, keyring) as store:
        assert account in await store.list_accounts()


@pytest.mark.parametrize("engine", ["postgres"])
async def test_two_writes_that_deadlock_both_commit(
    database_url: str, keyring: crypto.KeyRing
) -> None:
    """PostgreSQL rolls one of two deadlocked transactions back; the relay runs it again
    instead of failing it (an ACK batch so failed was lost and its events redelivered)."""
    holding = {1: asyncio.Event(), 2: asyncio.Event()}

    def crossing(first: int, second: int) -> database.WriteOp[int]:
        async def op(conn: AsyncConnection) -> int:
            await conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({first})"))
            holding[first].set()
            await holding[second].wait()  # both hold one lock: each now waits for the other
            await conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({second})"))
            return first

        return op

    async with opened_store(database_url, keyring) as store:
        done = await asyncio.wait_for(
            asyncio.gather(store.db.write(crossing(1, 2)), store.db.write(crossing(2, 1))), 30
        )
    assert sorted(done) == [1, 2]


@pytest.mark.parametrize("engine", ["postgres"])
async def test_lease_and_ack_writes_do_not_wait_for_the_wal_flush_and_webhooks_do(
    database_url: str,
) -> None:
    """Leases and ACKs are passed durable=False (a lost one is an event delivered again);
    on PostgreSQL their transaction alone runs with synchronous_commit off."""
    db = database.Database(database.DatabaseSettings(url=database_url, pool_size=1))
    await db.open()

    async def level(conn: AsyncConnection) -> str:
        return str(await conn.scalar(sa.text("SHOW synchronous_commit")))

    try:
        assert await db.write(level, durable=False) == "off"
        assert await db.write(level) == "on", "SET LOCAL ends with its transaction"
        assert await db.write(level, durable=False) == "off"
    finally:
        await db.close()
