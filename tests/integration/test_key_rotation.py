"""Key rotation on a real database: re-encryption, counts per key, removal, reloads."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pathlib
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from relay_server import crypto, errors, ids, keys, models
from relay_server.store import rekey, sql, tables, wait_replies
from tests.integration.conftest import Installation, install, opened_store

EVENTS = 1_000


@pytest.fixture
def key_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "stowhook.key"
    crypto.write_new_key_file(path)
    return path


@pytest.fixture
async def keyed_store(database_url: str, key_file: pathlib.Path) -> AsyncIterator[sql.SqlStore]:
    async with opened_store(database_url, crypto.load_key_file(key_file)) as opened:
        yield opened


def incoming(inst: Installation, n: int) -> models.IncomingEvent:
    return models.IncomingEvent(
        id=ids.new_id(),
        route=inst.route,
        method="POST",
        path=f"/hook/{n}",
        query=f"n={n}",
        headers=(("X-Seq", str(n)),),
        body=f'{{"seq": {n}}}'.encode(),
        received_at=dt.datetime.now(dt.UTC),
        source="127.0.0.1",
    )


async def stored_events(store: sql.SqlStore, inst: Installation, count: int) -> list[str]:
    events = [incoming(inst, n) for n in range(count)]
    for start in range(0, count, 100):
        await asyncio.gather(*(store.ingest(e) for e in events[start : start + 100]))
    return [e.id for e in events]


async def raw_sealed(store: sql.SqlStore) -> list[bytes]:
    E, INP = tables.events, tables.inputs
    async with store.db.read() as conn:
        rows = (
            await conn.execute(sa.select(E.c.query_sealed, E.c.headers_sealed, E.c.body_sealed))
        ).all()
        secrets = (
            await conn.execute(
                sa.select(INP.c.verify_secrets_sealed).where(
                    INP.c.verify_secrets_sealed.is_not(None)
                )
            )
        ).scalars()
        return [value for row in rows for value in row] + list(secrets)


async def rotate(store: sql.SqlStore, key_file: pathlib.Path) -> crypto.KeyRing:
    """What `keys rotate` does before re-encrypting: a new primary, loaded by the store."""
    with crypto.key_file_lock(key_file):
        ring = crypto.add_primary_key(key_file)
    store.use_keyring(ring)
    return ring


async def test_rotation_reseals_every_record_and_all_stay_readable(
    keyed_store: sql.SqlStore, key_file: pathlib.Path
) -> None:
    store = keyed_store
    inst = await install(store)
    signed = await store.create_input(inst.bucket, "signed")
    verification = models.Verification(kind=models.VerifyKind.GITHUB, secrets=("s3cret-one",))
    await store.set_verification(signed.id, verification)
    event_ids = await stored_events(store, inst, EVENTS)
    records = 3 * EVENTS + 1

    ring = await rotate(store, key_file)
    assert ring.primary_id == "k2" and set(ring.keys) == {"k1", "k2"}
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    before = {u.key_id: u.total for u in await keys.usage(store, ring)}
    assert before == {"k2": 0, "k1": records}

    seen: list[int] = []
    report = await rekey.reencrypt(store, batch_size=200, progress=lambda r: seen.append(r.done))

    assert (report.total, report.done, report.failed) == (records, records, 0)
    assert len(seen) >= EVENTS // 200 and seen == sorted(seen) and seen[-1] == records
    assert {u.key_id: u.total for u in await keys.usage(store, ring)} == {"k2": records, "k1": 0}
    sealed = await raw_sealed(store)
    assert len(sealed) == records
    assert all(crypto.KeyRing.key_id_of(value) == "k2" for value in sealed)
    for n, event_id in enumerate(event_ids):
        detail = await store.get_event(inst.account.id, event_id)
        assert (detail.query, detail.body) == (f"n={n}", f'{{"seq": {n}}}'.encode())
        assert detail.headers == (("X-Seq", str(n)),)
    route = await store.route(signed.id)
    assert route is not None and route.input.verification is not None
    assert route.input.verification.secrets == ("s3cret-one",)

    # The old key is no longer needed: it can go, and every record still opens without it.
    smaller = await keys.remove(store, key_file, "k1")
    assert list(smaller.keys) == ["k2"]
    store.use_keyring(crypto.load_key_file(key_file))
    assert (await store.get_event(inst.account.id, event_ids[0])).body == b'{"seq": 0}'


async def swap(store: sql.SqlStore, first: tuple[str, str], second: tuple[str, str]) -> None:
    """Exchange two sealed values: (event id, column) each."""
    E = tables.events

    async def op(conn: sa.ext.asyncio.AsyncConnection) -> None:
        values = []
        for event_id, column in (first, second):
            values.append(await conn.scalar(sa.select(E.c[column]).where(E.c.id == event_id)))
        for (event_id, column), value in zip((first, second), reversed(values), strict=True):
            await conn.execute(E.update().where(E.c.id == event_id).values({column: value}))

    await store.db.write(op)


async def test_a_ciphertext_moved_to_another_row_or_field_does_not_open(
    keyed_store: sql.SqlStore, key_file: pathlib.Path
) -> None:
    store = keyed_store
    inst = await install(store)
    first, second, third = await stored_events(store, inst, 3)
    await rotate(store, key_file)
    await rekey.reencrypt(store)

    await swap(store, (first, "body_sealed"), (second, "body_sealed"))
    await swap(store, (third, "headers_sealed"), (third, "body_sealed"))

    for event_id in (first, second, third):
        with pytest.raises(errors.CryptoError, match="moved from another row"):
            await store.get_event(inst.account.id, event_id)


async def test_an_interrupted_rotation_is_finished_by_running_it_again(
    keyed_store: sql.SqlStore, key_file: pathlib.Path
) -> None:
    store = keyed_store
    inst = await install(store)
    event_ids = await stored_events(store, inst, 250)
    await rotate(store, key_file)

    class Interrupted(Exception):
        pass

    def stop_after_first_batch(report: rekey.RekeyReport) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        await rekey.reencrypt(store, batch_size=100, progress=stop_after_first_batch)
    finished = await rekey.reencrypt(store, batch_size=100)

    assert (finished.total, finished.done) == (3 * 150, 3 * 150)  # only what was left
    again = await rekey.reencrypt(store, batch_size=100)
    assert (again.total, again.done) == (0, 0)
    assert all(crypto.KeyRing.key_id_of(v) == "k2" for v in await raw_sealed(store))
    assert (await store.get_event(inst.account.id, event_ids[-1])).body == b'{"seq": 249}'


async def test_a_record_that_cannot_be_opened_is_reported_and_keeps_its_key(
    keyed_store: sql.SqlStore, key_file: pathlib.Path
) -> None:
    store = keyed_store
    inst = await install(store)
    good, broken = await stored_events(store, inst, 2)
    await swap(store, (broken, "query_sealed"), (good, "query_sealed"))
    await rotate(store, key_file)

    report = await rekey.reencrypt(store)

    assert (report.done, report.failed) == (4, 2)
    assert {where for where, _ in report.failures} == {
        f"events.query_sealed:{good}",
        f"events.query_sealed:{broken}",
    }
    ring = store.keyring
    assert {u.key_id: u.total for u in await keys.usage(store, ring)} == {"k2": 4, "k1": 2}
    with pytest.raises(errors.Conflict, match="2 stored record"):
        await keys.remove(store, key_file, "k1")


async def test_remove_refuses_the_primary_and_unknown_keys(
    keyed_store: sql.SqlStore, key_file: pathlib.Path
) -> None:
    with pytest.raises(errors.Conflict, match="primary"):
        await keys.remove(keyed_store, key_file, "k1")
    with pytest.raises(errors.NotFound, match="no key 'k9'"):
        await keys.remove(keyed_store, key_file, "k9")
    with crypto.key_file_lock(key_file), pytest.raises(errors.ConfigError, match="another"):
        await rotate(keyed_store, key_file)


async def test_an_answer_waiting_for_its_caller_is_re_encrypted_and_still_opens(
    keyed_store: sql.SqlStore, key_file: pathlib.Path
) -> None:
    store = keyed_store
    inst = await install(store)
    (event_id,) = await stored_events(store, inst, 1)
    async with store.db.engine.begin() as conn:
        await wait_replies.put(conn, store.keyring, event_id, b"HTTP answer", 2**62)
    await rotate(store, key_file)

    report = await rekey.reencrypt(store)

    assert (report.done, report.failed) == (4, 0)  # 3 event columns and the answer
    async with store.db.engine.begin() as conn:
        sealed = await conn.scalar(sa.select(tables.wait_replies.c.answer_sealed))
        assert crypto.KeyRing.key_id_of(sealed) == "k2"
        assert await wait_replies.take(conn, store.keyring, [event_id]) == {
            event_id: b"HTTP answer"
        }


def test_every_sealed_column_of_the_schema_is_re_encrypted_by_rotation() -> None:
    binary = {
        f"{table.name}.{column.name}"
        for table in tables.metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, sa.LargeBinary)
    }
    assert binary == {col.name for col in rekey.SEALED}


async def test_a_server_follows_its_key_file(
    keyed_store: sql.SqlStore, key_file: pathlib.Path
) -> None:
    store = keyed_store
    reloader = keys.KeyReloader(store, key_file, interval_s=0.05)
    task = asyncio.create_task(reloader.run())
    try:
        with crypto.key_file_lock(key_file):
            ring = crypto.add_primary_key(key_file)
        for _ in range(100):
            if store.keyring.primary_id == ring.primary_id:
                break
            await asyncio.sleep(0.02)
        assert store.keyring.primary_id == "k2" and set(store.keyring.keys) == {"k1", "k2"}

        # A file that changes the bytes of a key in use is refused: the keys stay.
        tampered = crypto.KeyRing(
            primary_id="k2", keys={**ring.keys, "k1": os.urandom(crypto.KEY_BYTES)}
        )
        crypto.write_key_file(key_file, tampered)
        assert reloader.check(force=True) is False
        assert store.keyring.keys["k1"] == ring.keys["k1"]
    finally:
        reloader.stop()
        await task
