"""SQLite keeps bodies of 1 MiB or more as sealed files beside the database
(store/bodyfiles.py): what a user relies on is that such a webhook is stored sealed,
comes back whole to agents, `event show` and `migrate-data`, survives a key rotation,
and that its file goes when nothing names it any more."""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import time
from collections.abc import Iterable

import pytest
import sqlalchemy as sa

from relay_server import crypto, errors, keys, models
from relay_server.migrate_data import migrate_data
from relay_server.store import bodyfiles, events, rekey, sql, tables
from tests import pg
from tests.integration.conftest import Installation, install, opened_store
from tests.integration.test_store import incoming, lease, settle
from tests.integration.test_store_policies import with_headers

pytestmark = pytest.mark.sqlite_only("body files exist on SQLite only")

SECRET = b"card=4242424242424242;"  # what must never be readable at rest


def large_body(size: int = bodyfiles.FROM_BYTES + 12_345) -> bytes:
    chunk = SECRET + os.urandom(1000)
    return (chunk * (size // len(chunk) + 1))[:size]


def files_of(store: sql.SqlStore) -> list[pathlib.Path]:
    folder = store.bodies.folder
    return sorted(folder.iterdir()) if folder.exists() else []


def age(path: pathlib.Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def body_file_flags(store: sql.SqlStore) -> dict[str, bool]:
    E = tables.events
    async with store.db.read() as conn:
        rows = (await conn.execute(sa.select(E.c.id, E.c.body_file))).all()
    return {event_id: bool(flag) for event_id, flag in rows}


async def test_a_large_body_is_a_sealed_file_and_comes_back_whole(
    installed: Installation,
) -> None:
    store = installed.store
    body = large_body()
    event = incoming(installed, body)

    assert await store.ingest(event) is None

    (path,) = files_of(store)
    assert path.name == event.id
    assert path.stat().st_mode & 0o777 == 0o600, "only the server's user reads it"
    assert SECRET not in path.read_bytes(), "the file is ciphertext"
    assert await body_file_flags(store) == {event.id: True}
    db_file = store.db.settings.sqlite_file
    assert db_file is not None
    for stored in (db_file, db_file.with_name(db_file.name + "-wal")):
        assert SECRET not in stored.read_bytes()
    async with store.db.read() as conn:
        in_row = await conn.scalar(sa.select(sa.func.length(tables.events.c.body_sealed)))
    assert in_row < 100, "the row holds a sealed empty body, not the body"
    (got,) = await lease(store, installed)
    assert got.body == body and got.headers == event.headers and got.query == event.query
    detail = await store.get_event(installed.account.id, event.id)
    assert detail.body == body
    status = await store.status(installed.account.id)
    assert status.database_files[str(store.bodies.folder)] == path.stat().st_size


async def test_a_body_under_the_threshold_stays_in_its_row(installed: Installation) -> None:
    store = installed.store
    event = incoming(installed, large_body(bodyfiles.FROM_BYTES - 1))
    await store.ingest(event)
    assert files_of(store) == []
    assert await body_file_flags(store) == {event.id: False}
    (got,) = await lease(store, installed)
    assert got.body == event.body


async def test_a_duplicate_leaves_no_file_behind(installed: Installation) -> None:
    store, route = installed.store, installed.route
    copies = [
        with_headers(installed, route, ("X-Provider-Event-Id", "evt_big"), body=large_body())
        for _ in range(3)
    ]
    answers = [await store.ingest(copy) for copy in copies]
    assert answers == [None, copies[0].id, copies[0].id]
    assert [path.name for path in files_of(store)] == [copies[0].id]


async def test_a_missing_body_file_dead_letters_the_delivery_with_the_reason(
    installed: Installation,
) -> None:
    store = installed.store
    lost, kept = incoming(installed, large_body()), incoming(installed, b"small")
    await store.ingest(lost)
    await store.ingest(kept)
    store.bodies.path(lost.id).unlink()

    leased = await lease(store, installed)

    assert [item.event_id for item in leased] == [kept.id], "the other event is unaffected"
    detail = await store.get_event(installed.account.id, kept.id)
    assert detail.body == b"small"
    with pytest.raises(errors.StorageError, match=r"body file .* is missing"):
        await store.get_event(installed.account.id, lost.id)
    (dead,) = await store.list_events(
        events.EventFilter(account_id=installed.account.id, state=models.DeliveryState.DEAD)
    )
    assert dead.id == lost.id and dead.size == len(lost.body)
    assert [d.last_error for d in dead.deliveries] == [sql.BODY_FILE_LOST]


async def test_a_disk_that_refuses_the_file_is_a_503_and_nothing_is_stored(
    installed: Installation,
) -> None:
    store = installed.store
    store.bodies.folder.write_bytes(b"")  # a file where the folder should be: mkdir fails
    with pytest.raises(errors.StorageUnavailable, match="could not write the body file"):
        await store.ingest(incoming(installed, large_body()))
    assert await body_file_flags(store) == {}
    await store.ingest(small := incoming(installed, b"{}"))
    assert await body_file_flags(store) == {small.id: False}, "small bodies still go in"


async def test_the_cleaner_removes_files_no_event_names_once_they_are_old(
    installed: Installation,
) -> None:
    store = installed.store
    done, pending = incoming(installed, large_body()), incoming(installed, large_body())
    for event in (done, pending):
        await store.ingest(event)
    (first,) = await lease(store, installed, limit=1)
    await store.settle([settle(first, models.Outcome.ACK)], agent="t")
    orphan_old = store.bodies.folder / "0190aaaa-0000-7000-8000-000000000001"
    orphan_young = store.bodies.folder / "0190aaaa-0000-7000-8000-000000000002"
    stray_rekey = store.bodies.folder / f"{pending.id}.new"
    for path in (orphan_old, orphan_young, stray_rekey):
        path.write_bytes(b"sealed leftovers")
    for path in (orphan_old, stray_rekey, *files_of(store)):
        if path != orphan_young:
            age(path, bodyfiles.ORPHAN_GRACE_S + 60)
    bucket = await store.get_bucket(installed.account.id, installed.bucket.name)
    await store.update_bucket(bucket, dataclasses.replace(bucket.policy, retention_ms=1))
    age_event = sa.update(tables.events).values(received_at=models.now_ms() - 60_000)
    await store.db.write(lambda conn: conn.execute(age_event))

    removed = await store.clean()

    assert (removed["events"], removed["body_files"]) == (1, 2)
    assert {path.name for path in files_of(store)} == {pending.id, orphan_young.name}, (
        "the delivered event's file and the old orphan went; the pending event's file and "
        "a file too young to judge stay"
    )
    assert (await lease(store, installed))[0].body == pending.body


async def test_rotation_re_encrypts_body_files_before_their_rows(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    key_file = tmp_path / "stowhook.key"
    crypto.write_new_key_file(key_file)
    async with opened_store(database_url, crypto.load_key_file(key_file)) as store:
        inst = await install(store)
        events = [incoming(inst, large_body()) for _ in range(3)]
        for event in events:
            await store.ingest(event)
        broken = events[2]
        store.bodies.path(broken.id).write_bytes(store.bodies.read(events[1].id))  # wrong aad
        with crypto.key_file_lock(key_file):
            ring = crypto.add_primary_key(key_file)
        store.use_keyring(ring)

        report = await rekey.reencrypt(store)

        assert report.failed == 1
        assert [where for where, _ in report.failures] == [f"events.body file:{broken.id}"]
        prefix = crypto.record_prefix(ring.primary_id)
        assert all(store.bodies.read(e.id).startswith(prefix) for e in events[:2])
        assert [path.name for path in files_of(store)] == sorted(e.id for e in events), (
            "no temporary file is left behind"
        )
        usage = {u.key_id: u.total for u in await keys.usage(store, ring)}
        assert usage[ring.primary_id] > 0 and usage["k1"] == 3, (
            "the broken event's row stays under the old key, so that key cannot be removed"
        )
        only_new = crypto.KeyRing(
            primary_id=ring.primary_id, keys={ring.primary_id: ring.keys[ring.primary_id]}
        )
        store.use_keyring(only_new)
        bodies = {item.event_id: item.body for item in await lease(store, inst, limit=2)}
        assert bodies == {e.id: e.body for e in events[:2]}


@pytest.mark.skipif(not pg.pg_available(), reason=pg.SKIP_REASON)
async def test_migrate_data_carries_file_bodies_into_postgresql_rows(
    installed: Installation, keyring: crypto.KeyRing
) -> None:
    store = installed.store
    big, small = incoming(installed, large_body()), incoming(installed, b"{}")
    await store.ingest(big)
    await store.ingest(small)
    async with pg.fresh_database("body_files") as url:
        async with opened_store(url, keyring) as target:
            outcome = await migrate_data(store.db, target.db, batch_rows=1)
            assert outcome.ok
            assert target.db.bodies is None
            detail = await target.get_event(installed.account.id, big.id)
            assert detail.body == big.body
            flags = await body_file_flags(target)
            assert flags == {big.id: False, small.id: False}


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
@pytest.mark.parametrize(
    "pieces",
    [
        [16, 1_000_000, 2_000_000, 16],  # a sealed record: head, chunks, tag
        [bodyfiles.DIRECT_CHUNK],  # exactly one aligned block
        [bodyfiles.DIRECT_ALIGN * 3],
        [1, 4095, 1],  # the last block padded, the file cut back
        [],
    ],
)
def test_a_body_file_holds_exactly_what_was_written(
    tmp_path: pathlib.Path, pieces: list[int], direct: bool
) -> None:
    files = bodyfiles.BodyFiles(tmp_path / "relay.db.bodies")
    files.direct = direct
    record = [os.urandom(n) for n in pieces]
    files.write("0190aaaa-0000-7000-8000-000000000003", record)
    assert files.read("0190aaaa-0000-7000-8000-000000000003") == b"".join(record)
    assert files.direct == direct, "ext4 (this machine's /tmp) takes O_DIRECT"


def test_a_body_file_is_never_written_over_another(tmp_path: pathlib.Path) -> None:
    files = bodyfiles.BodyFiles(tmp_path / "relay.db.bodies")
    files.write("0190aaaa-0000-7000-8000-000000000003", [b"x" * 3_000_000])
    with pytest.raises(FileExistsError):
        files.write("0190aaaa-0000-7000-8000-000000000003", [b"other"])
    assert files.read("0190aaaa-0000-7000-8000-000000000003") == b"x" * 3_000_000
    with pytest.raises(errors.StorageError, match="not an event id"):
        files.path("../relay.db")


def test_a_file_system_without_o_direct_gets_buffered_files(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older tmpfs and some network file systems answer O_DIRECT with EINVAL."""
    real_open = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    files = bodyfiles.BodyFiles(tmp_path / "relay.db.bodies")
    files.write("0190aaaa-0000-7000-8000-000000000004", [b"sealed", b"body"])
    assert files.read("0190aaaa-0000-7000-8000-000000000004") == b"sealedbody"
    assert files.direct is False, "the next files go buffered without asking again"


async def test_a_key_reloaded_while_a_body_file_is_written_seals_file_and_row_alike(
    installed: Installation, keyring: crypto.KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotation counts a key in use by the rows: a file under another key than its row
    would let `keys remove` drop the key that file needs."""
    store = installed.store
    newer = crypto.KeyRing(primary_id="k9", keys={"k9": os.urandom(32), **keyring.keys})
    write = store.bodies.write

    def reload_midway(event_id: str, record: Iterable[bytes]) -> None:
        store.use_keyring(newer)  # SIGHUP after a rotation, while the file is written
        write(event_id, record)

    monkeypatch.setattr(store.bodies, "write", reload_midway)
    event = incoming(installed, large_body())
    await store.ingest(event)

    async with store.db.read() as conn:
        row = await conn.scalar(sa.select(tables.events.c.body_sealed))
    file_key = crypto.KeyRing.key_id_of(store.bodies.read(event.id))
    assert crypto.KeyRing.key_id_of(row) == file_key == keyring.primary_id
