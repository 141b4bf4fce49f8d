"""/healthz, /readyz and gRPC health against a real server, and the writer after faults."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sqlite3
from collections.abc import AsyncIterator

import grpc.aio
import pytest
import sqlalchemy as sa
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay_server import errors, settings
from relay_server.dispatch import hub
from relay_server.ingress import app as ingress_app
from relay_server.store import database, sql
from tests.integration.conftest import Running


@contextlib.asynccontextmanager
async def write_locked(db_file: pathlib.Path) -> AsyncIterator[None]:
    """Another connection holds SQLite's write lock (as a stuck process would).

    Taken in a thread: the server in this event loop may hold the lock for a moment
    and needs the loop to let it go.
    """
    other = sqlite3.connect(db_file, timeout=5, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(other.execute, "BEGIN EXCLUSIVE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def db_file_of(url: str) -> pathlib.Path:
    return pathlib.Path(url.split("///", 1)[1])


async def get(port: int, path: str) -> tuple[int, dict[str, str]]:
    async with ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.json()


async def test_readyz_is_200_when_the_database_takes_writes(running_server: Running) -> None:
    port = running_server.relay.http_port
    assert port is not None
    assert await get(port, "/readyz") == (200, {"status": "ready"})
    assert await get(port, "/healthz") == (200, {"status": "ok"})


@pytest.mark.sqlite_only("holds SQLite's file lock from another connection")
async def test_readyz_is_503_while_another_process_holds_the_write_lock(
    running_server: Running,
) -> None:
    port = running_server.relay.http_port
    assert port is not None
    await asyncio.sleep(ingress_app.PROBE_CACHE_S)  # forget any earlier good probe
    async with write_locked(db_file_of(running_server.relay.config.database.url)):
        status, body = await get(port, "/readyz")
        assert status == 503
        assert body["status"] == "unavailable"
        assert body["reason"].startswith("database not writable")
        assert await get(port, "/healthz") == (200, {"status": "ok"}), "alive all the same"
    await asyncio.sleep(ingress_app.PROBE_CACHE_S)
    assert await get(port, "/readyz") == (200, {"status": "ready"})


@pytest.fixture
async def client(store: sql.SqlStore) -> AsyncIterator[TestClient]:
    app = ingress_app.create_app(store, hub.Hub(), settings.IngressSettings())
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


async def test_readyz_follows_grpc_and_shutdown_flags(client: TestClient) -> None:
    app = client.server.app
    assert app is not None
    resp = await client.get("/readyz")
    assert (resp.status, (await resp.json())["reason"]) == (503, "agent stream server not serving")
    app[ingress_app.GRPC_SERVING][0] = True
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"status": "ready"})
    app[ingress_app.READY][0] = False
    resp = await client.get("/readyz")
    assert (resp.status, (await resp.json())["reason"]) == (503, "shutting down")
    assert resp.headers["Retry-After"] == "1"


async def test_a_flood_of_readyz_costs_one_probe_per_second(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.server.app[ingress_app.GRPC_SERVING][0] = True  # type: ignore[index]
    store = client.server.app[ingress_app.STORE]  # type: ignore[index]
    probes = 0
    real = store.db.probe_write

    async def counted() -> None:
        nonlocal probes
        probes += 1
        await real()

    monkeypatch.setattr(store.db, "probe_write", counted)
    statuses = [(await client.get("/readyz")).status for _ in range(50)]
    assert statuses == [200] * 50
    assert probes == 1


async def test_grpc_health_turns_not_serving_on_stop(running_server: Running) -> None:
    async with grpc.aio.insecure_channel(running_server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        running_server.relay.stop()
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


@pytest.fixture
async def db(tmp_path: pathlib.Path) -> AsyncIterator[database.Database]:
    handle = database.Database(
        database.DatabaseSettings(url=f"sqlite:///{tmp_path / 'w.db'}", sqlite_busy_timeout_ms=100)
    )
    await handle.open()
    await handle.write(lambda c: c.execute(sa.text("CREATE TABLE t (n INTEGER)")))
    try:
        yield handle
    finally:
        await handle.close()


async def insert(db: database.Database, n: int) -> None:
    await db.write(lambda c: c.execute(sa.text("INSERT INTO t VALUES (:n)"), {"n": n}))


async def count(db: database.Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar_one())


async def test_a_locked_database_fails_writes_then_recovers(
    db: database.Database, tmp_path: pathlib.Path
) -> None:
    async with write_locked(tmp_path / "w.db"):
        results = await asyncio.gather(*(insert(db, n) for n in range(5)), return_exceptions=True)
        assert all(isinstance(r, errors.StorageUnavailable) for r in results), results
        with pytest.raises(errors.StorageUnavailable):
            await db.probe_write()
    await insert(db, 99)
    await db.probe_write()
    assert await count(db) == 1, "the failed group left nothing behind"


async def test_a_failing_operation_leaves_no_open_transaction(db: database.Database) -> None:
    async def broken(conn: sa.ext.asyncio.AsyncConnection) -> None:
        await conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        raise ValueError("bug in an operation")

    async def bad_sql(conn: sa.ext.asyncio.AsyncConnection) -> None:
        await conn.execute(sa.text("INSERT INTO t VALUES (2)"))
        await conn.execute(sa.text("INSERT INTO missing VALUES (1)"))

    with pytest.raises(ValueError):
        await db.write(broken)
    with pytest.raises(errors.StorageError):
        await db.write(bad_sql)
    # The next group starts cleanly and neither half-done operation was committed.
    await asyncio.gather(*(insert(db, n) for n in range(3)))
    assert await count(db) == 3
    with contextlib.closing(sqlite3.connect(db_file_of(db.settings.url), timeout=1)) as other:
        other.execute("BEGIN IMMEDIATE")  # the writer holds no lock between groups
        other.execute("ROLLBACK")
