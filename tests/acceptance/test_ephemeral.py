"""Ephemeral buckets through real processes: delivered, yet nowhere in the database files."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3

from tests.acceptance import harness
from tests.acceptance.test_delivery import post


async def ephemeral_bucket(relay: harness.Relay) -> tuple[str, str]:
    """A bucket `vault` created with --ephemeral: (its input id, an agent token for it)."""
    await relay.cli("bucket", "create", "vault", "--ephemeral")
    input_id = (await relay.cli_json("input", "create", "--bucket", "vault"))["id"]
    token = (await relay.cli_json("token", "create", "--bucket", "vault"))["token"]
    return input_id, token


def canary() -> tuple[str, bytes]:
    """A marker and a body made of random bytes around it."""
    marker = f"canary-{secrets.token_hex(12)}"
    return marker, secrets.token_bytes(48) + marker.encode() + secrets.token_bytes(48)


def database_bytes(relay: harness.Relay) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in relay.db_path.parent.glob("stowhook.db*")}
    assert "stowhook.db" in files
    return files


def assert_nowhere(files: dict[str, bytes], *needles: bytes) -> None:
    for name, data in files.items():
        for needle in needles:
            assert needle not in data, f"{needle[:40]!r} found in {name}"


async def test_a_canary_is_delivered_and_never_written_to_the_database(relay, agents) -> None:
    vault, token = await ephemeral_bucket(relay)
    relay.start()
    await relay.wait_ready()
    marker, body = canary()
    durable_marker, durable_body = canary()
    async with harness.Target() as target:
        agents(target.url, bucket="vault", token=token, name="vault-agent")
        agents(target.url, name="durable-agent")
        # Durable buckets keep the path tail in clear (only query, headers and body are
        # sealed); ephemeral ones keep it in memory like the rest.
        sends = ((vault, marker, body, f"/{marker}"), (None, durable_marker, durable_body, ""))
        for input_id, word, payload, tail in sends:
            status, _, _ = await post(
                relay.input_url(input_id, tail=tail) + f"?c={word}",
                payload,
                {"X-Canary": word},
            )
            assert status == 200
        await target.wait_for(2)
        by_body = {r.body: r for r in target.received}
        assert set(by_body) == {body, durable_body}, "both delivered byte for byte"
        forwarded = by_body[body]
        assert (forwarded.path, forwarded.query, forwarded.header("X-Canary")) == (
            f"/{marker}",
            f"c={marker}",
            marker,
        ), "path, query and headers came from memory intact"
        states = await harness.wait_deliveries(
            relay,
            lambda d: len(d) == 2 and all(x["state"] == "delivered" for x in d.values()),
            15,
            "both deliveries",
        )
        assert len(states) == 2, "the ephemeral event's status is recorded like any other"
        running_files = database_bytes(relay)
    relay.stop()  # checkpoints the WAL into the main file
    for files in (running_files, database_bytes(relay)):
        assert_nowhere(files, marker.encode(), body[:48], body[-48:])
        # The durable canary is on disk too, but sealed (the next test shows its size there).
        assert_nowhere(files, durable_marker.encode(), durable_body[:48])
    assert marker not in relay.log_text() and durable_marker not in relay.log_text()
    detail = await relay.cli_json("event", "show", (await ephemeral_event_id(relay, vault)))
    assert detail["summary"]["path"] == "" and detail["body"] == "" and detail["headers"] == []


async def ephemeral_event_id(relay: harness.Relay, input_id: str) -> str:
    events = await relay.cli_json("event", "list", "--bucket", "vault")
    (event,) = [e for e in events if e["input_id"] == input_id]
    return str(event["id"])


async def test_a_durable_event_is_stored_sealed_and_an_ephemeral_one_not_at_all(relay) -> None:
    """What makes the canary search meaningful: the durable body is in the files, sealed."""
    vault, _ = await ephemeral_bucket(relay)
    before = sum(len(data) for data in database_bytes(relay).values())
    relay.start()
    await relay.wait_ready()
    size = 200_000  # large enough to weigh on the database files
    assert (await post(relay.input_url(vault), secrets.token_bytes(size)))[0] == 200
    relay.stop()
    after_ephemeral = sum(len(data) for data in database_bytes(relay).values())
    relay.start()
    await relay.wait_ready()
    assert (await post(relay.input_url(), secrets.token_bytes(size)))[0] == 200
    relay.stop()
    with contextlib.closing(sqlite3.connect(relay.db_path)) as db:
        stored = dict(
            db.execute(
                "SELECT b.name, length(e.body_sealed)"
                " FROM events e JOIN buckets b ON b.id = e.bucket_id"
            )
        )
    # (File growth is no measure of the durable body: it may fill pages freed earlier.)
    assert (stored["vault"] or 0) < 64, "the ephemeral event holds an empty record at most"
    assert stored["quickstart"] >= size, "the durable body landed on disk (sealed)"
    assert after_ephemeral - before < size // 10, "the ephemeral body never did"


async def test_after_a_restart_a_pending_ephemeral_event_goes_dead_with_a_clear_error(
    relay, agents
) -> None:
    vault, token = await ephemeral_bucket(relay)
    relay.start()
    await relay.wait_ready()
    _, body = canary()
    assert (await post(relay.input_url(vault), body))[0] == 200
    (event_id,) = (await harness.delivery_states(relay)).keys()
    relay.stop()
    relay.start()
    await relay.wait_ready()
    async with harness.Target() as target:
        agents(target.url, bucket="vault", token=token)
        states = await harness.wait_deliveries(
            relay, lambda d: d[event_id]["state"] == "dead", 15, "the lost event to go dead"
        )
        assert target.received == [], "never delivered empty"
    assert states[event_id]["last_error"].startswith("ephemeral payload lost: server restarted")
    dead = await relay.cli_json("dlq", "list", "--error", "ephemeral payload lost")
    assert [e["id"] for e in dead] == [event_id]
