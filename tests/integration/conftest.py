from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from relay_server import auth, crypto, models, retry, server, settings
from relay_server.store import database, sql
from tests import pg

FAST = retry.RetryPolicy(initial_ms=100, cap_ms=500, max_attempts=5)
ENGINES = ("sqlite", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only(reason): the test inspects the SQLite file itself"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that asks for `engine` (through database_url, store, installed,
    running_server) runs once per engine: the storage contract holds on both."""
    chosen = any(  # @pytest.mark.parametrize("engine", [...]) picks its own
        "engine" in str(mark.args[0]) for mark in metafunc.definition.iter_markers("parametrize")
    )
    if "engine" in metafunc.fixturenames and not chosen:
        only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("engine", ENGINES[:1] if only_sqlite else ENGINES)


@pytest.fixture(scope="session")
def pg_supply() -> Iterator[pg.DatabaseSupply]:
    """Clones of one PostgreSQL database migrated once per session (cloning is fast)."""
    pg.require_pg()
    template = pg.run_sync(pg.migrated_template())
    supply = pg.DatabaseSupply("stowhook_it", template)
    try:
        yield supply
    finally:
        supply.close()
        pg.run_sync(pg.drop_database(template))


@pytest.fixture
def database_url(
    engine: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """sqlite: tmp_path/relay.db; postgres: a fresh migrated database, dropped afterwards."""
    if engine == "sqlite":
        yield f"sqlite:///{tmp_path / 'relay.db'}"
        return
    supply: pg.DatabaseSupply = request.getfixturevalue("pg_supply")
    url = supply.take()
    try:
        yield url
    finally:
        supply.give_back(url)


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
async def opened_store(url: str, keyring: crypto.KeyRing) -> AsyncIterator[sql.SqlStore]:
    """A migrated, open store on `url` (see database_url) with fast test retries."""
    opened = sql.SqlStore(database.DatabaseSettings(url=url), keyring, retry_base=FAST)
    await opened.migrate()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(database_url: str, keyring: crypto.KeyRing) -> AsyncIterator[sql.SqlStore]:
    async with opened_store(database_url, keyring) as opened:
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
async def running_server(
    database_url: str, tmp_path: pathlib.Path, keyring: crypto.KeyRing
) -> AsyncIterator[Running]:
    """A RelayServer in this event loop on free loopback ports, 1 s leases."""
    config = settings.ServerSettings(
        database=database.DatabaseSettings(url=database_url),
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
