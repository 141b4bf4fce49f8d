from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from relay_server import auth, crypto, models, retry, server, settings
from relay_server.store import database, sql

FAST = retry.RetryPolicy(initial_ms=100, cap_ms=500, max_attempts=5)


@dataclass
class Installation:
    store: sql.SqlStore
    account: models.Account
    bucket: models.Bucket
    route: models.Route
    token: str


async def install(store: sql.SqlStore) -> Installation:
    account = await store.create_account("default")
    bucket = await store.create_bucket(
        account.id,
        "orders",
        models.BucketPolicy(max_attempts=5, max_age_ms=3_600_000, retention_ms=86_400_000),
    )
    created = await store.create_input(bucket, "main")
    route = await store.route(created.id)
    assert route is not None
    key_id, secret = auth.new_token()
    await store.create_token(
        key_id=key_id,
        account_id=account.id,
        name="t",
        secret_hash=auth.hash_secret(secret, rounds=4),
        bucket_ids=[bucket.id],
    )
    return Installation(
        store=store, account=account, bucket=bucket, route=route, token=f"{key_id}.{secret}"
    )


@pytest.fixture
def keyring() -> crypto.KeyRing:
    return crypto.parse_key_file(crypto.generate_key_line())


@contextlib.asynccontextmanager
async def opened_store(
    tmp_path: pathlib.Path, keyring: crypto.KeyRing
) -> AsyncIterator[sql.SqlStore]:
    """A migrated, open store on tmp_path/relay.db with fast test retries."""
    opened = sql.SqlStore(
        database.DatabaseSettings(url=f"sqlite:///{tmp_path / 'relay.db'}"),
        keyring,
        retry_base=FAST,
    )
    await opened.migrate()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(tmp_path: pathlib.Path, keyring: crypto.KeyRing) -> AsyncIterator[sql.SqlStore]:
    async with opened_store(tmp_path, keyring) as opened:
        yield opened


@pytest.fixture
async def installed(store: sql.SqlStore) -> Installation:
    return await install(store)


@dataclass
class Running:
    relay: server.RelayServer
    installation: Installation

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.relay.grpc_port}"


@pytest.fixture
async def running_server(tmp_path: pathlib.Path, keyring: crypto.KeyRing) -> AsyncIterator[Running]:
    """A RelayServer in this event loop on free loopback ports, 1 s leases."""
    config = settings.ServerSettings(
        database=database.DatabaseSettings(url=f"sqlite:///{tmp_path / 'relay.db'}"),
        key_file=tmp_path / "unused.key",
        ingress=settings.IngressSettings(listen="127.0.0.1:0"),
        grpc=settings.GrpcSettings(listen="127.0.0.1:0"),
        dispatch=settings.DispatchSettings(
            lease_ms=1000, poll_interval_s=0.05, reap_interval_s=0.1, retry=FAST
        ),
    )
    async with serving(config, keyring) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(
    config: settings.ServerSettings, keyring: crypto.KeyRing
) -> AsyncIterator[Running]:
    """A RelayServer with `config` running in this event loop, installed (see install)."""
    relay = server.RelayServer(config, keyring)
    ready = asyncio.Event()
    task = asyncio.create_task(relay.run(on_ready=lambda _: ready.set()), name="relay")
    await asyncio.wait({task, asyncio.create_task(ready.wait())}, return_when="FIRST_COMPLETED")
    if task.done():
        task.result()
    installation = await install(relay.store)
    try:
        yield Running(relay=relay, installation=installation)
    finally:
        relay.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
