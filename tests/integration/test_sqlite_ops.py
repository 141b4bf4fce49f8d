"""On SQLite the hottest writes run in plain sqlite3 (store/queue_sqlite.py, one hop to the
writer's thread). They must store and answer exactly what their SQLAlchemy twins (the
ones PostgreSQL runs) do: the same scenario runs through each on its own file, and every
row and every answer is compared, value for value and type for type."""

from __future__ import annotations

import functools
import pathlib
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from relay_server import crypto, models
from relay_server.store import queue, queue_sqlite
from tests.integration.conftest import Installation, install, opened_store
from tests.integration.test_store import incoming
from tests.integration.test_store_policies import ordered_bucket, with_headers

TABLES = ("events", "deliveries", "dedup_keys", "seen_nonces", "attempts")
TIMES = ("received_at", "created_at", "updated_at", "available_at", "leased_at", "ended_at")
TIMES += ("lease_expires_at", "first_attempt_at", "expires_at", "started_at", "deadline_ms")


def new_events(inst: Installation, route: models.Route) -> list[queue.NewEvent]:
    """Four webhooks: plain (an agent has a place for it on every output), with an id
    header and a nonce, a duplicate, a replay."""
    keyring, policy = inst.store.keyring, route.bucket.policy
    nonce = models.Nonce(value="ab" * 32, expires_at_ms=models.now_ms() + 60_000)
    webhooks = [
        (incoming(inst, b"plain", route=route), None),
        (with_headers(inst, route, ("X-Provider-Event-Id", "e-1"), body=b"the first"), nonce),
        (with_headers(inst, route, ("X-Provider-Event-Id", "e-1"), body=b"again"), None),
        (with_headers(inst, route, ("X-Provider-Event-Id", "e-2"), body=b"replayed"), nonce),
    ]
    slots = {output_id: ("key/agent", 30_000) for output_id in route.output_ids}
    return [
        queue.NewEvent(
            row=queue.seal_event(keyring, event),
            bucket_id=route.bucket.id,
            dedup_key=models.dedup_key(policy.dedup_headers, event.headers),
            dedup_window_ms=policy.dedup_window_ms,
            nonce=nonce,
            slots=slots if place == 0 else {},
        )
        for place, (event, nonce) in enumerate(webhooks)
    ]


class Names:
    """Ids of one installation replaced by what they name, so two installations compare."""

    def __init__(self) -> None:
        self.names: dict[Any, str] = {}

    async def learn(self, inst: Installation) -> None:
        async with inst.store.db.read() as conn:
            for table, query in (
                ("event", "SELECT id, 'event ' || size FROM events"),
                ("output", "SELECT id, 'output ' || name FROM outputs"),
                ("bucket", "SELECT id, 'bucket ' || name FROM buckets"),
                ("input", "SELECT id, 'input ' || name FROM inputs"),
                (
                    "delivery",
                    "SELECT d.id, e.size || '/' || o.name FROM deliveries d"
                    " JOIN events e ON e.id = d.event_id JOIN outputs o ON o.id = d.output_id",
                ),
            ):
                for key, name in await conn.execute(sa.text(query)):
                    self.names[key] = f"{table}: {name}" if table == "delivery" else name

    def __call__(self, column: str, value: Any) -> Any:
        if column in TIMES or column.endswith("_sealed"):
            return None  # a time of this run, or random-nonce ciphertext
        if column == "lease_id":
            try:
                delivery_id, attempt = models.parse_lease_id(value)
            except ValueError:
                return value
            return f"lease {self.names.get(delivery_id, delivery_id)} #{attempt}"
        return self.names.get(value, value)


async def rows(inst: Installation, names: Names) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    async with inst.store.db.read() as conn:
        for table in TABLES:
            info = await conn.execute(sa.text(f"PRAGMA table_info({table})"))
            columns = [row[1] for row in info if row[1] != "id" or table != "attempts"]
            typed = ", ".join(f"{c}, typeof({c})" for c in columns)
            found[table] = sorted(
                (
                    tuple(
                        (c, names(c, value), kind)
                        for c, value, kind in zip(columns, row[::2], row[1::2], strict=True)
                    )
                    for row in await conn.execute(sa.text(f"SELECT {typed} FROM {table}"))
                ),
                key=repr,
            )
    return found


def lease_view(lease: queue.RawLease, names: Names) -> list[tuple[str, Any]]:
    fields = {**{k: getattr(lease, k) for k in lease.__slots__ if k != "event"}}
    fields.update({f"event.{k}": v for k, v in lease.event._asdict().items()})
    return sorted((k, names(k.removeprefix("event."), v)) for k, v in fields.items())


async def scenario(folder: pathlib.Path, keyring: crypto.KeyRing, *, plain: bool) -> Any:
    """Ingest four webhooks, claim both outputs, ACK what was claimed (and a stale and a
    malformed lease id): through queue_sqlite when `plain`, else through queue."""
    async with opened_store(f"sqlite:///{folder / f'{plain}.db'}", keyring) as store:
        inst = await install(store)
        _, route = await ordered_bucket(inst)  # "default" ordered, "audit" not
        db, names = store.db, Names()
        ingested = []
        for event in new_events(inst, route):
            many = {"sqlite_many": queue_sqlite.insert_events} if plain else {}
            ingested.append(await db.write_coalesced("ingest", queue.insert_events, event, **many))
        claim = {"output_ids": route.output_ids, "limit": 10, "lease_ms": 5_000, "holder": "h"}
        claimed = await db.write(
            functools.partial(queue.claim, **claim),  # type: ignore[arg-type]
            sqlite=functools.partial(queue_sqlite.claim, **claim) if plain else None,  # type: ignore[arg-type]
        )
        await names.learn(inst)
        handed = [lease for result in ingested for lease in result.leased]  # attempt 1
        acks = [models.format_lease_id(delivery_id, 1) for _, delivery_id, _ in handed]
        acks += [models.format_lease_id(lease.delivery_id, lease.attempt) for lease in claimed]
        acks += [models.format_lease_id(claimed[0].delivery_id, 9), "not-a-lease"]
        settlements = [models.Settlement(lease_id=a, outcome=models.Outcome.ACK) for a in acks]
        settle = {"settlements": settlements, "agent": "key/agent"}
        lost = await db.write(
            functools.partial(queue.settle, **settle, base_policy=store.retry_base),  # type: ignore[arg-type]
            sqlite=functools.partial(queue_sqlite.settle_acks, **settle) if plain else None,  # type: ignore[arg-type]
        )
        return {
            "ingested": [
                (i.stored, i.replay, names("event_id", i.duplicate_of), len(i.leased))
                for i in ingested
            ],
            "claimed": [lease_view(lease, names) for lease in claimed],
            "ordered": claimed.ordered,
            "lost": [names("lease_id", lease_id) for lease_id in lost],
            "rows": await rows(inst, names),
        }


async def test_plain_sqlite_writes_store_and_answer_what_the_sqlalchemy_ones_do(
    tmp_path: pathlib.Path, keyring: crypto.KeyRing
) -> None:
    by_sqlalchemy = await scenario(tmp_path, keyring, plain=False)
    by_sqlite3 = await scenario(tmp_path, keyring, plain=True)

    assert by_sqlalchemy["ingested"] == [
        (True, False, None, 1),  # leased at ingest on "audit"; "default" is ordered
        (True, False, None, 0),
        (False, False, "event 9", 0),  # a duplicate of the second: nothing stored
        (False, True, None, 0),  # a replay of the second's nonce: nothing stored
    ]
    assert len(by_sqlalchemy["claimed"]) == 2  # the ordered output's head, one on "audit"
    assert by_sqlalchemy["lost"] == ["not-a-lease", "lease delivery: 5/default #9"]
    assert [len(by_sqlalchemy["rows"][t]) for t in TABLES] == [2, 4, 1, 1, 3]
    assert by_sqlite3 == by_sqlalchemy


def test_multi_row_inserts_bind_a_bounded_number_of_rows_and_bytes() -> None:
    table = sa.Table(
        "blobs", sa.MetaData(), sa.Column("n", sa.Integer), sa.Column("data", sa.LargeBinary)
    )
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE blobs (n INTEGER, data BLOB)")
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    big = b"x" * (600 * 1024)
    rows = [{"n": n, "data": big} for n in range(3)]  # 1.2 MiB after two: a statement ends
    rows += [{"n": n, "data": b"s"} for n in range(3, 3 + 130)]  # 130 small: 64, 64, 3

    queue_sqlite._insert_rows(db, table, rows)

    inserts = [statement for statement in statements if statement.startswith("INSERT")]
    per_statement = [statement.count("), (") + 1 for statement in inserts]
    assert per_statement == [2, 64, 64, 3]
    stored = db.execute("SELECT n, length(data) FROM blobs ORDER BY rowid").fetchall()
    assert stored == [(row["n"], len(row["data"])) for row in rows]  # all, in order


async def test_only_the_ingest_waits_for_an_fsync_leases_and_acks_ride_on_the_next_one(
    tmp_path: pathlib.Path, keyring: crypto.KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """synchronous=FULL is for the 2xx; a lease or an ACK lost to power loss (never to a
    crash of the server) only means a delivery made again, so they commit at NORMAL."""
    levels: dict[str, int] = {}

    def observed(name: str, write: Callable[..., Any]) -> Callable[..., Any]:
        def run(db: sqlite3.Connection, *args: Any, **kwargs: Any) -> Any:
            levels[name] = db.execute("PRAGMA synchronous").fetchone()[0]
            return write(db, *args, **kwargs)

        return run

    for name in ("insert_events", "claim", "settle_acks"):
        monkeypatch.setattr(queue_sqlite, name, observed(name, getattr(queue_sqlite, name)))
    async with opened_store(f"sqlite:///{tmp_path / 's.db'}", keyring) as store:
        inst = await install(store)
        await store.ingest(incoming(inst, b"{}"))
        leases = await store.lease(inst.route.output_ids, limit=5, lease_ms=5_000, holder="h")
        acks = [
            models.Settlement(lease_id=lease.lease_id, outcome=models.Outcome.ACK)
            for lease in leases
        ]
        assert await store.settle(acks, agent="key/agent") == []

    assert len(leases) == 1
    assert levels == {"insert_events": 2, "claim": 1, "settle_acks": 1}  # 2 FULL, 1 NORMAL
