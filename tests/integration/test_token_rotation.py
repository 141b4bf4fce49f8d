"""Agent token rotation: two valid secrets during a grace period, then only the new one."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from relay_proto import relay_pb2
from relay_server import auth, errors
from relay_server.store import audit_log, sql
from tests.integration.conftest import Installation, Running
from tests.integration.test_agent_stream import RawAgent


async def rotate(store: sql.SqlStore, inst: Installation, grace_ms: int) -> str:
    key_id = inst.token.partition(".")[0]
    secret = auth.new_token()[1]
    await store.rotate_token(inst.account.id, key_id, auth.hash_secret(secret, rounds=4), grace_ms)
    return f"{key_id}.{secret}"


async def test_old_and_new_secrets_work_during_the_grace_and_only_the_new_after(
    installed: Installation,
) -> None:
    store, old = installed.store, installed.token
    verifier = auth.TokenVerifier(store)
    assert (await verifier.verify(old)).key_id == old.partition(".")[0]  # cached from here

    new = await rotate(store, installed, grace_ms=1_500)

    assert (await verifier.verify(old)).previous_valid_until is not None
    assert (await verifier.verify(new)).key_id == old.partition(".")[0]
    await asyncio.sleep(1.6)
    with pytest.raises(errors.AuthError, match="wrong secret"):
        await verifier.verify(old)  # its cached check does not outlive the grace
    await verifier.verify(new)

    await store.revoke_token(installed.account.id, new.partition(".")[0])
    with pytest.raises(errors.AuthError, match="revoked"):
        await verifier.verify(new)


async def test_without_grace_the_old_secret_stops_at_once(installed: Installation) -> None:
    verifier = auth.TokenVerifier(installed.store)
    await verifier.verify(installed.token)

    new = await rotate(installed.store, installed, grace_ms=0)

    with pytest.raises(errors.AuthError):
        await verifier.verify(installed.token)
    await verifier.verify(new)


async def test_a_second_rotation_ends_the_first_grace(installed: Installation) -> None:
    verifier = auth.TokenVerifier(installed.store)
    second = await rotate(installed.store, installed, grace_ms=60_000)
    third = await rotate(installed.store, installed, grace_ms=60_000)

    with pytest.raises(errors.AuthError):
        await verifier.verify(installed.token)
    await verifier.verify(second)
    await verifier.verify(third)


async def test_a_revoked_token_cannot_be_rotated(installed: Installation) -> None:
    key_id = installed.token.partition(".")[0]
    await installed.store.revoke_token(installed.account.id, key_id)
    with pytest.raises(errors.NotFound, match="no active token"):
        await rotate(installed.store, installed, grace_ms=1_000)


async def connects(running: Running, token: str) -> tuple[grpc.StatusCode | None, str]:
    agent = RawAgent(running.grpc_target, token)
    agent.send(subscribe=relay_pb2.Subscribe(buckets=["orders"], agent_name="rotating"))
    try:
        first = await agent.read()
    except grpc.aio.AioRpcError as exc:
        await agent.close()
        return exc.code(), exc.details() or ""
    await agent.close()
    return None, first.WhichOneof("kind") or ""


async def test_agents_connect_with_either_secret_and_every_connect_is_audited(
    running_server: Running,
) -> None:
    store, inst = running_server.relay.store, running_server.installation
    key_id = inst.token.partition(".")[0]
    new = await rotate(store, inst, grace_ms=60_000)

    assert await connects(running_server, inst.token) == (None, "welcome")
    assert await connects(running_server, new) == (None, "welcome")
    assert await connects(running_server, f"{key_id}.not-the-secret") == (
        grpc.StatusCode.UNAUTHENTICATED,
        "token refused",
    )
    await store.revoke_token(inst.account.id, key_id)
    for token in (inst.token, new):
        refused = await connects(running_server, token)
        assert refused == (grpc.StatusCode.UNAUTHENTICATED, "token refused")
    code, _ = await connects(running_server, "no-key-id-here")
    assert code is grpc.StatusCode.UNAUTHENTICATED

    entries: list[audit_log.AuditEntry] = []
    for _ in range(50):  # disconnects are written as the streams close
        entries = await store.list_audit(audit_log.AuditFilter(action_prefix="agent"))
        if sum(e.action == "agent.disconnect" for e in entries) == 2:
            break
        await asyncio.sleep(0.05)
    seen = sorted((e.action, e.result, e.actor) for e in entries)
    assert seen == sorted(
        [
            ("agent.connect", "ok", key_id),
            ("agent.connect", "ok", key_id),
            ("agent.disconnect", "ok", key_id),
            ("agent.disconnect", "ok", key_id),
            ("agent.connect", "denied", key_id),
            ("agent.connect", "denied", key_id),
            ("agent.connect", "denied", key_id),
            ("agent.connect", "denied", "(malformed)"),
        ]
    )
    assert all(e.source.startswith("ipv4:127.0.0.1:") for e in entries)
    texts = " ".join(f"{e.actor} {e.resource} {e.detail}" for e in entries)
    secrets = [inst.token.partition(".")[2], new.partition(".")[2], "not-the-secret"]
    for secret in [*secrets, "no-key-id-here"]:
        assert secret not in texts
