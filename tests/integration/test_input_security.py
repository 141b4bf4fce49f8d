"""Input auth, signatures, replays and failed-auth throttling through the real HTTP ingress
(and the real gRPC port) of an in-process server, with the events counted in its database.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import sqlite3
import time
from typing import Any

import aiohttp
import grpc
import pytest
import sqlalchemy as sa
import standardwebhooks
from multidict import CIMultiDictProxy

from relay_proto import relay_pb2
from relay_server import auth, errors, ids, models
from relay_server.store import sql, tables
from tests.integration.conftest import Installation, Running
from tests.integration.test_agent_stream import RawAgent, status_of

PASSWORD = "correct horse battery staple"
TOKEN = "tok_9f3e1c0b7a5d4e2f8a6b"
SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-test-key!!").decode()
THROTTLE_AFTER = 20  # the server's default --auth-failure-limit

Answer = tuple[int, "CIMultiDictProxy[str]", str]


async def post(
    running: Running,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    body: bytes = b'{"n": 1}',
    source: str = "127.0.0.1",
    input_id: str | None = None,
    **options: Any,
) -> Answer:
    """POST to the input from `source` (any 127.x address is this machine)."""
    url = (
        f"http://127.0.0.1:{running.relay.http_port}/in/{input_id or inst(running).route.input.id}"
    )
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data=body, headers=headers, params=params, **options) as r:
            return r.status, r.headers, await r.text()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


def inst(running: Running) -> Installation:
    return running.installation


async def stored_events(store: sql.SqlStore) -> list[models.EventDetail]:
    async with store.db.read() as conn:
        event_ids = (await conn.scalars(sa.select(tables.events.c.id))).all()
    account = (await store.get_account("default")).id
    return [await store.get_event(account, event_id) for event_id in event_ids]


async def protect(running: Running, kind: models.InputAuthKind) -> None:
    secret = PASSWORD if kind is models.InputAuthKind.BASIC else TOKEN
    await running.relay.store.set_input_auth(
        inst(running).bucket,
        models.InputAuth(
            kind=kind,
            username="shop" if kind is models.InputAuthKind.BASIC else "",
            secret_hash=auth.hash_secret(secret, rounds=4),
        ),
    )


async def test_basic_auth_right_wrong_and_missing(running_server: Running) -> None:
    await protect(running_server, models.InputAuthKind.BASIC)
    right = await post(running_server, headers=basic("shop", PASSWORD))
    assert right[0] == 200
    wrong = [
        await post(running_server, headers=basic("shop", PASSWORD + "x")),
        await post(running_server, headers=basic("nobody", PASSWORD)),  # unknown user
        await post(running_server),  # missing
        await post(running_server, headers={"Authorization": "Basic !!!"}),  # malformed
        await post(running_server, headers={"Authorization": f"Bearer {PASSWORD}"}),
    ]
    answers = {(status, h["WWW-Authenticate"], text) for status, h, text in wrong}
    assert answers == {
        (401, 'Basic realm="stowhook", charset="UTF-8"', "missing or wrong credentials\n")
    }
    [event] = await stored_events(running_server.relay.store)
    assert not any(name.lower() == "authorization" for name, _ in event.headers), (
        "the relay's credential is not handed on to the destination"
    )


async def test_token_auth_by_header_or_query_parameter(running_server: Running) -> None:
    await protect(running_server, models.InputAuthKind.TOKEN)
    assert (await post(running_server, headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 200
    assert (await post(running_server, params={"keep": "1", "token": TOKEN}))[0] == 200
    wrong = [
        await post(running_server, headers={"Authorization": f"Bearer {TOKEN}x"}),
        await post(running_server, params={"token": "tok_unknown"}),
        await post(running_server, params={"token": "x" * 100}),  # longer than bcrypt takes
        await post(running_server),
        await post(running_server, headers=basic("shop", TOKEN)),
    ]
    assert {(s, h["WWW-Authenticate"], t) for s, h, t in wrong} == {
        (401, 'Bearer realm="stowhook"', "missing or wrong credentials\n")
    }
    events = await stored_events(running_server.relay.store)
    assert sorted(event.query for event in events) == ["", "keep=1"]


def signed(body: bytes, msg_id: str, ts: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers made by the official library."""
    when = dt.datetime.fromtimestamp(ts or int(time.time()), dt.UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": standardwebhooks.Webhook(SECRET).sign(msg_id, when, body.decode()),
    }


async def verify_standard(running: Running) -> None:
    await running.relay.store.set_verification(
        inst(running).route.input.id,
        models.Verification(kind=models.VerifyKind.STANDARD, secrets=(SECRET,)),
    )


async def test_a_bad_signature_is_refused_and_nothing_stored(running_server: Running) -> None:
    await verify_standard(running_server)
    body = b'{"type": "invoice.paid"}'
    headers = signed(body, "msg_1")
    tampered = await post(running_server, headers=headers, body=body.replace(b"paid", b"void"))
    stale = await post(
        running_server, headers=signed(body, "msg_1", int(time.time()) - 301), body=body
    )
    unsigned = await post(running_server, body=body)
    assert {(s, t) for s, _, t in (tampered, stale, unsigned)} == {(401, "invalid signature\n")}
    assert await stored_events(running_server.relay.store) == []
    assert (await post(running_server, headers=headers, body=body))[0] == 200


async def test_the_same_signed_webhook_twice_is_a_replay(running_server: Running) -> None:
    await verify_standard(running_server)
    body = b'{"type": "invoice.paid"}'
    headers = signed(body, "msg_replayed")
    first = await post(running_server, headers=headers, body=body)
    again = await post(running_server, headers=headers, body=body)
    assert (first[0], again[0], again[2]) == (200, 401, "replay\n")
    assert len(await stored_events(running_server.relay.store)) == 1
    # The provider's own retry is signed anew (same id, new timestamp): not a replay.
    retry = await post(
        running_server, headers=signed(body, "msg_replayed", int(time.time()) - 5), body=body
    )
    assert retry[0] == 200


@pytest.mark.sqlite_only("breaks the insert with a trigger in the SQLite file")
async def test_a_retry_after_a_503_is_not_taken_for_a_replay(
    running_server: Running, tmp_path: Any
) -> None:
    """The nonce is recorded in the transaction that stores the event: when that fails,
    the very same signed request may come again."""
    await verify_standard(running_server)
    body = b'{"type": "invoice.paid"}'
    headers = signed(body, "msg_after_503")
    with sqlite3.connect(tmp_path / "relay.db") as db:  # the insert fails after the nonce
        db.execute(
            "CREATE TRIGGER full BEFORE INSERT ON events "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    failed = await post(running_server, headers=headers, body=body)
    with sqlite3.connect(tmp_path / "relay.db") as db:
        db.execute("DROP TRIGGER full")
    assert (failed[0], failed[1].get("Retry-After")) == (503, "5")
    assert (await post(running_server, headers=headers, body=body))[0] == 200
    assert (await post(running_server, headers=headers, body=body))[2] == "replay\n"
    assert len(await stored_events(running_server.relay.store)) == 1


async def test_unknown_revoked_and_wrong_agent_tokens_get_the_same_answer(
    running_server: Running,
) -> None:
    store, installation = running_server.relay.store, inst(running_server)
    key_id, secret = auth.new_token()
    await store.create_token(
        key_id=key_id,
        account_id=installation.account.id,
        name="gone",
        secret_hash=auth.hash_secret(secret, rounds=4),
        bucket_ids=[installation.bucket.id],
    )
    await store.revoke_token(installation.account.id, key_id)
    own_key = installation.token.split(".")[0]
    answers = set()
    for token in (f"shk_0123456789abcdef.{secret}", f"{key_id}.{secret}", f"{own_key}.{secret}"):
        agent = RawAgent(running_server.grpc_target, token)
        agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"]))
        answers.add(await status_of(agent))
    assert answers == {(grpc.StatusCode.UNAUTHENTICATED, "token refused")}


async def test_failures_throttle_their_source_over_http_and_grpc(running_server: Running) -> None:
    """Refused agent tokens and refused webhook credentials count together, per source."""
    await protect(running_server, models.InputAuthKind.TOKEN)
    right = {"Authorization": f"Bearer {TOKEN}"}
    own_key = inst(running_server).token.split(".")[0]
    for _ in range(THROTTLE_AFTER - 1):
        agent = RawAgent(running_server.grpc_target, f"{own_key}.wrong")
        agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"]))
        assert (await status_of(agent))[0] is grpc.StatusCode.UNAUTHENTICATED
    assert (await post(running_server, headers={"Authorization": "Bearer nope"}))[0] == 401

    status, headers, _ = await post(running_server, headers=right)
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
    agent = RawAgent(running_server.grpc_target, inst(running_server).token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"]))
    code, details = await status_of(agent)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("too many failed authentication attempts; retry in ")

    assert (await post(running_server, headers=right, source="127.0.0.2"))[0] == 200
    assert len(await stored_events(running_server.relay.store)) == 1


async def test_a_throttled_source_is_refused_before_its_credentials_are_checked(
    running_server: Running,
) -> None:
    await protect(running_server, models.InputAuthKind.BASIC)
    wrong = basic("shop", "guess")
    for _ in range(THROTTLE_AFTER):
        assert (await post(running_server, headers=wrong, source="127.0.0.3"))[0] == 401
    right = basic("shop", PASSWORD)
    assert (await post(running_server, headers=right, source="127.0.0.3"))[0] == 429
    assert (await post(running_server, headers=right))[0] == 200  # other sources go on
    # An input that asks for nothing has nothing to guess: the source may still post there.
    other = await running_server.relay.store.create_bucket(inst(running_server).account.id, "open")
    open_input = await running_server.relay.store.create_input(other, "main")
    assert (await post(running_server, source="127.0.0.3", input_id=open_input.id))[0] == 200


# ---- the store: nonces in the ingest transaction, and their cleaning ------------------


def incoming(installation: Installation, nonce: models.Nonce | None) -> models.IncomingEvent:
    return models.IncomingEvent(
        id=ids.new_id(),
        route=installation.route,
        method="POST",
        path="",
        query="",
        headers=(),
        body=b"{}",
        received_at=dt.datetime.now(dt.UTC),
        source="test",
        nonce=nonce,
    )


async def test_concurrent_copies_of_one_nonce_store_one_event(installed: Installation) -> None:
    nonce = models.Nonce(value="a" * 64, expires_at_ms=models.now_ms() + 60_000)
    results = await asyncio.gather(
        *(installed.store.ingest(incoming(installed, nonce)) for _ in range(5)),
        return_exceptions=True,
    )
    assert sum(result is None for result in results) == 1
    assert all(isinstance(result, errors.Replay) for result in results if result is not None)
    assert len(await stored_events(installed.store)) == 1
    # The same nonce on another input is that input's business.
    other = await installed.store.create_input(installed.bucket, "second")
    route = await installed.store.route(other.id)
    assert route is not None
    assert (
        await installed.store.ingest(dataclasses.replace(incoming(installed, nonce), route=route))
        is None
    )


async def test_the_cleaner_forgets_expired_nonces(installed: Installation) -> None:
    expired = models.Nonce(value="b" * 64, expires_at_ms=models.now_ms() - 1)
    live = models.Nonce(value="c" * 64, expires_at_ms=models.now_ms() + 60_000)
    await installed.store.ingest(incoming(installed, expired))
    await installed.store.ingest(incoming(installed, live))
    removed = await installed.store.clean()
    assert removed["nonces"] == 1
    async with installed.store.db.read() as conn:
        left = (await conn.scalars(sa.select(tables.seen_nonces.c.nonce))).all()
    assert left == ["c" * 64]
