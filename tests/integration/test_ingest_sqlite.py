"""SQLite ingest runs in plain sqlite3 (one hop to the writer's thread): it must store
exactly what the SQLAlchemy path (PostgreSQL's) stores, value for value and type for type,
and answer the same for duplicates, replays and deliveries leased at ingest."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import sqlalchemy as sa

from relay_server import crypto, models
from relay_server.store import queue
from tests.integration.conftest import Installation, install, opened_store
from tests.integration.test_store import incoming
from tests.integration.test_store_policies import ordered_bucket, with_headers

TABLES = ("events", "deliveries", "dedup_keys", "seen_nonces")
NOW_LIKE = ("received_at", "created_at", "updated_at", "available_at", "leased_at")
NOW_LIKE += ("lease_expires_at", "first_attempt_at", "expires_at")


def new_events(inst: Installation, route: models.Route) -> list[queue.NewEvent]:
    """Four webhooks: plain, with an id header and a nonce, a duplicate, a replay."""
    keyring, policy = inst.store.keyring, route.bucket.policy
    nonce = models.Nonce(value="ab" * 32, expires_at_ms=models.now_ms() + 60_000)
    webhooks = [
        (incoming(inst, b"plain", route=route), None),
        (with_headers(inst, route, ("X-Provider-Event-Id", "e-1"), body=b"first"), nonce),
        (with_headers(inst, route, ("X-Provider-Event-Id", "e-1"), body=b"again"), None),
        (with_headers(inst, route, ("X-Provider-Event-Id", "e-2"), body=b"replayed"), nonce),
    ]
    return [
        queue.NewEvent(
            row=queue.seal_event(keyring, event),
            bucket_id=route.bucket.id,
            dedup_key=models.dedup_key(policy.dedup_headers, event.headers),
            dedup_window_ms=policy.dedup_window_ms,
            nonce=nonce,
            slots={output_id: ("key/agent", 30_000) for output_id in route.output_ids},
        )
        for event, nonce in webhooks
    ]


async def stored(inst: Installation) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of TABLES, ids replaced by the event's place, times by their type."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    async with inst.store.db.read() as conn:
        order = {
            event_id: place
            for place, event_id in enumerate(
                (await conn.execute(sa.text("SELECT id FROM events ORDER BY size"))).scalars()
            )
        }
        for table in TABLES:
            columns = [row[1] for row in await conn.execute(sa.text(f"PRAGMA table_info({table})"))]
            typed = ", ".join(f"{c}, typeof({c})" for c in columns)
            rows = []
            for row in await conn.execute(sa.text(f"SELECT {typed} FROM {table}")):
                values = []
                for column, value, kind in zip(columns, row[::2], row[1::2], strict=True):
                    if column in ("id", "event_id") and table != "seen_nonces":
                        value = order.get(value, "delivery id" if table == "deliveries" else value)
                    elif column in NOW_LIKE or column.endswith("_sealed"):
                        value = None  # a time of this run, or random-nonce ciphertext
                    values.append((column, value, kind))
                rows.append(tuple(values))
            found[table] = sorted(rows, key=repr)
    return found


async def write_and_read(
    inst: Installation, events: list[queue.NewEvent], *, plain: bool
) -> tuple[list[Any], dict[str, list[tuple[Any, ...]]]]:
    db = inst.store.db
    if plain:
        results = [
            await db.write_coalesced(
                "ingest", queue.insert_events, event, sqlite_many=queue.insert_events_sqlite
            )
            for event in events
        ]
    else:
        results = [
            await db.write(functools.partial(queue.insert_events, events=[e])) for e in events
        ]
        results = [one for (one,) in results]
    first = str(events[1].row["id"])
    answers = [
        (r.stored, r.replay, r.duplicate_of == first, sorted(o for o, _, _ in r.leased))
        for r in results
    ]
    return answers, await stored(inst)


async def test_plain_sqlite_ingest_stores_what_the_sqlalchemy_path_stores(
    tmp_path: pathlib.Path, keyring: crypto.KeyRing
) -> None:
    async with opened_store(f"sqlite:///{tmp_path / 'rows.db'}", keyring) as store:
        inst = await install(store)
        audit, route = await ordered_bucket(inst)  # "default" ordered, "audit" not

        by_sqlalchemy = await write_and_read(inst, new_events(inst, route), plain=False)
        async with store.db.engine.begin() as conn:
            for table in ("deliveries", "events", "dedup_keys", "seen_nonces"):
                await conn.execute(sa.text(f"DELETE FROM {table}"))
        by_sqlite3 = await write_and_read(inst, new_events(inst, route), plain=True)

    answers, rows = by_sqlalchemy
    assert answers == [
        (True, False, False, [audit.id]),  # leased to the agent on "audit" only: ordered
        (True, False, False, [audit.id]),
        (False, False, True, []),  # a duplicate of the second: nothing stored
        (False, True, False, []),  # a replay of the second's nonce: nothing stored
    ]
    assert [len(rows[t]) for t in TABLES] == [2, 4, 1, 1]
    assert by_sqlite3 == by_sqlalchemy
