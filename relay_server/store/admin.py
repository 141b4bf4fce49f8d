"""Accounts, buckets, inputs, outputs, agent tokens and the audit log in SQL."""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import errors, ids, models
from relay_server.store import codecs, tables

A, B, INP, OUT = tables.accounts, tables.buckets, tables.inputs, tables.outputs
T, TB = tables.agent_tokens, tables.token_buckets
DEFAULT_OUTPUT = "default"


def account_from_row(row: Any) -> models.Account:
    return models.Account(id=row.id, name=row.name, created_at=models.from_ms(row.created_at))


def bucket_from_row(row: Any) -> models.Bucket:
    return models.Bucket(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        policy=models.BucketPolicy(
            max_attempts=row.max_attempts,
            max_age_ms=row.max_age_ms,
            retention_ms=row.retention_ms,
            dlq_retention_ms=row.dlq_retention_ms,
            dedup_headers=tuple(json.loads(row.dedup_headers)),
            dedup_window_ms=row.dedup_window_ms,
            ephemeral=bool(row.ephemeral),
        ),
        created_at=models.from_ms(row.created_at),
        input_auth=codecs.load_input_auth(row.input_auth),
    )


def policy_columns(policy: models.BucketPolicy) -> dict[str, object]:
    columns = dataclasses.asdict(policy)
    columns["dedup_headers"] = json.dumps(list(policy.dedup_headers))
    return columns


def input_from_row(row: Any) -> models.Input:
    return models.Input(
        id=row.id,
        bucket_id=row.bucket_id,
        name=row.name,
        max_body_bytes=row.max_body_bytes,
        created_at=models.from_ms(row.created_at),
        verification=codecs.load_verification(row.verify),
        response=codecs.load_response(row.response),
        rate_limit=None
        if row.rate_per_s is None
        else models.RateLimit(per_s=row.rate_per_s, burst=row.rate_burst),
    )


async def create_account(conn: AsyncConnection, name: str) -> models.Account:
    if (await conn.execute(sa.select(A.c.id).where(A.c.name == name))).first():
        raise errors.Conflict(f"account {name!r} already exists")
    account_id, now = ids.new_id(), models.now_ms()
    await conn.execute(A.insert().values(id=account_id, name=name, created_at=now))
    return models.Account(id=account_id, name=name, created_at=models.from_ms(now))


async def get_account(conn: AsyncConnection, name: str) -> models.Account:
    row = (await conn.execute(sa.select(A).where(A.c.name == name))).first()
    if row is None:
        raise errors.NotFound(f"no account named {name!r}")
    return account_from_row(row)


async def list_accounts(conn: AsyncConnection) -> list[models.Account]:
    return [account_from_row(r) for r in await conn.execute(sa.select(A).order_by(A.c.name))]


async def create_bucket(
    conn: AsyncConnection,
    account_id: str,
    name: str,
    policy: models.BucketPolicy,
) -> models.Bucket:
    exists = sa.select(B.c.id).where(B.c.account_id == account_id, B.c.name == name)
    if (await conn.execute(exists)).first():
        raise errors.Conflict(f"bucket {name!r} already exists")
    now = models.now_ms()
    row = {
        "id": ids.new_id(),
        "account_id": account_id,
        "name": name,
        **policy_columns(policy),
        "created_at": now,
        "input_auth": None,
    }
    await conn.execute(B.insert().values(**row))
    await conn.execute(
        OUT.insert().values(
            id=ids.new_id(),
            bucket_id=row["id"],
            name=DEFAULT_OUTPUT,
            kind=models.OutputKind.AGENT,
            ordered=False,
            created_at=now,
        )
    )
    return bucket_from_row(types.SimpleNamespace(**row))


async def update_bucket(
    conn: AsyncConnection, bucket: models.Bucket, policy: models.BucketPolicy
) -> models.Bucket:
    """Replace the bucket's policy; it applies to events already stored too."""
    await conn.execute(B.update().where(B.c.id == bucket.id).values(**policy_columns(policy)))
    return dataclasses.replace(bucket, policy=policy)


async def set_input_auth(
    conn: AsyncConnection, bucket: models.Bucket, auth: models.InputAuth | None
) -> models.Bucket:
    await conn.execute(
        B.update().where(B.c.id == bucket.id).values(input_auth=codecs.dump_input_auth(auth))
    )
    return dataclasses.replace(bucket, input_auth=auth)


async def get_input(conn: AsyncConnection, account_id: str, input_id: str) -> models.Input:
    row = (
        await conn.execute(
            sa.select(INP)
            .join(B, B.c.id == INP.c.bucket_id)
            .where(INP.c.id == input_id, B.c.account_id == account_id)
        )
    ).first()
    if row is None:
        raise errors.NotFound(f"no input with id {input_id!r}")
    return input_from_row(row)


async def update_input(conn: AsyncConnection, input_id: str, **columns: object) -> None:
    """Set columns of the inputs row (callers encode them: see store.codecs)."""
    await conn.execute(INP.update().where(INP.c.id == input_id).values(**columns))


async def get_bucket(conn: AsyncConnection, account_id: str, name: str) -> models.Bucket:
    row = (
        await conn.execute(sa.select(B).where(B.c.account_id == account_id, B.c.name == name))
    ).first()
    if row is None:
        raise errors.NotFound(f"no bucket named {name!r}")
    return bucket_from_row(row)


async def list_buckets(conn: AsyncConnection, account_id: str) -> list[models.Bucket]:
    query = sa.select(B).where(B.c.account_id == account_id).order_by(B.c.name)
    return [bucket_from_row(row) for row in await conn.execute(query)]


async def bucket_counts(conn: AsyncConnection, bucket_id: str) -> dict[str, int]:
    """Deliveries of the bucket by state, plus its inputs and events."""
    by_state = await conn.execute(
        sa.select(tables.deliveries.c.state, sa.func.count())
        .join(OUT, OUT.c.id == tables.deliveries.c.output_id)
        .where(OUT.c.bucket_id == bucket_id)
        .group_by(tables.deliveries.c.state)
    )
    counts = {str(state): int(n) for state, n in by_state}
    for table, key in ((INP, "inputs"), (tables.events, "events")):
        total = await conn.scalar(
            sa.select(sa.func.count()).select_from(table).where(table.c.bucket_id == bucket_id)
        )
        counts[key] = int(total or 0)
    return counts


async def account_counts(conn: AsyncConnection, account_id: str) -> dict[str, int]:
    """Deliveries of the whole account by state (every state present, 0 if none)."""
    by_state = await conn.execute(
        sa.select(tables.deliveries.c.state, sa.func.count())
        .join(OUT, OUT.c.id == tables.deliveries.c.output_id)
        .join(B, B.c.id == OUT.c.bucket_id)
        .where(B.c.account_id == account_id)
        .group_by(tables.deliveries.c.state)
    )
    counts = {str(state): 0 for state in models.DeliveryState}
    counts.update({str(state): int(n) for state, n in by_state})
    return counts


async def oldest_pending_ms(conn: AsyncConnection, account_id: str) -> int | None:
    """received_at of the account's oldest event with a PENDING delivery, or None."""
    E, D = tables.events, tables.deliveries
    value = await conn.scalar(
        sa.select(sa.func.min(E.c.received_at))
        .select_from(D)
        .join(E, E.c.id == D.c.event_id)
        .join(B, B.c.id == E.c.bucket_id)
        .where(B.c.account_id == account_id, D.c.state == models.DeliveryState.PENDING)
    )
    return None if value is None else int(value)


async def schema_revision(conn: AsyncConnection) -> str | None:
    """The Alembic revision the database is at."""
    rows = await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
    return ",".join(str(row[0]) for row in rows) or None


async def delete_bucket(conn: AsyncConnection, bucket: models.Bucket, *, force: bool) -> None:
    counts = await bucket_counts(conn, bucket.id)
    waiting = counts.get("pending", 0) + counts.get("leased", 0)
    if waiting and not force:
        raise errors.Conflict(
            f"bucket {bucket.name!r} still has {waiting} undelivered events; "
            "use --force to delete them too"
        )
    await conn.execute(B.delete().where(B.c.id == bucket.id))


async def create_input(
    conn: AsyncConnection, bucket: models.Bucket, name: str, max_body_bytes: int | None
) -> models.Input:
    row = {
        "id": ids.new_id(),
        "bucket_id": bucket.id,
        "name": name,
        "max_body_bytes": max_body_bytes,
        "created_at": models.now_ms(),
        "verify": None,
        "verify_secrets_sealed": None,
        "response": None,
        "rate_per_s": None,
        "rate_burst": None,
    }
    await conn.execute(INP.insert().values(**row))
    return input_from_row(types.SimpleNamespace(**row))


async def list_inputs(
    conn: AsyncConnection, account_id: str, bucket_id: str | None
) -> list[tuple[models.Input, str]]:
    query = (
        sa.select(INP, B.c.name.label("bucket_name"))
        .join(B, B.c.id == INP.c.bucket_id)
        .where(B.c.account_id == account_id)
        .order_by(B.c.name, INP.c.created_at)
    )
    if bucket_id is not None:
        query = query.where(INP.c.bucket_id == bucket_id)
    return [(input_from_row(row), row.bucket_name) for row in await conn.execute(query)]


async def delete_input(conn: AsyncConnection, account_id: str, input_id: str) -> None:
    owned = sa.select(B.c.id).where(B.c.account_id == account_id)
    result = await conn.execute(
        INP.delete().where(INP.c.id == input_id, INP.c.bucket_id.in_(owned))
    )
    if result.rowcount != 1:
        raise errors.NotFound(f"no input with id {input_id!r}")


async def route(conn: AsyncConnection, input_id: str) -> tuple[models.Route, bytes | None] | None:
    """The input's route, with its sealed signing secrets (opened by the caller)."""
    row = (await conn.execute(sa.select(INP).where(INP.c.id == input_id))).first()
    if row is None:
        return None
    bucket = bucket_from_row(
        (await conn.execute(sa.select(B).where(B.c.id == row.bucket_id))).one()
    )
    output_ids = (
        await conn.execute(
            sa.select(OUT.c.id).where(OUT.c.bucket_id == bucket.id).order_by(OUT.c.id)
        )
    ).scalars()
    found = models.Route(input=input_from_row(row), bucket=bucket, output_ids=tuple(output_ids))
    return found, row.verify_secrets_sealed


async def outputs_for(
    conn: AsyncConnection, account_id: str, bucket_names: Sequence[str], output: str
) -> dict[str, str]:
    """Output id per bucket name; NotFound naming the first bucket that has none."""
    rows = await conn.execute(
        sa.select(B.c.name, OUT.c.id)
        .join(OUT, OUT.c.bucket_id == B.c.id)
        .where(B.c.account_id == account_id, B.c.name.in_(bucket_names), OUT.c.name == output)
    )
    found = dict(rows.all())
    for name in bucket_names:
        if name not in found:
            raise errors.NotFound(f"bucket {name!r} has no output {output!r}")
    return found


def token_from_row(row: Any, bucket_ids: Sequence[str]) -> models.Token:
    return models.Token(
        key_id=row.key_id,
        account_id=row.account_id,
        name=row.name,
        bucket_ids=tuple(bucket_ids),
        created_at=models.from_ms(row.created_at),
        revoked_at=None if row.revoked_at is None else models.from_ms(row.revoked_at),
        last_used_at=None if row.last_used_at is None else models.from_ms(row.last_used_at),
        client_cert_sha256=row.client_cert_sha256,
        previous_valid_until=None
        if row.previous_valid_until is None
        else models.from_ms(row.previous_valid_until),
    )


async def create_token(
    conn: AsyncConnection,
    *,
    key_id: str,
    account_id: str,
    name: str,
    secret_hash: str,
    bucket_ids: Sequence[str],
) -> models.Token:
    now = models.now_ms()
    await conn.execute(
        T.insert().values(
            key_id=key_id,
            account_id=account_id,
            name=name,
            secret_hash=secret_hash,
            created_at=now,
        )
    )
    if bucket_ids:
        await conn.execute(TB.insert(), [{"key_id": key_id, "bucket_id": b} for b in bucket_ids])
    row = (await conn.execute(sa.select(T).where(T.c.key_id == key_id))).one()
    return token_from_row(row, bucket_ids)


async def get_token(
    conn: AsyncConnection, key_id: str
) -> tuple[models.Token, tuple[str, ...]] | None:
    """The token and the bcrypt hashes that open it now: the current secret's, then the
    previous secret's while its grace period runs."""
    row = (await conn.execute(sa.select(T).where(T.c.key_id == key_id))).first()
    if row is None:
        return None
    scope = (await conn.execute(sa.select(TB.c.bucket_id).where(TB.c.key_id == key_id))).scalars()
    hashes: tuple[str, ...] = (row.secret_hash,)
    if row.previous_secret_hash and (row.previous_valid_until or 0) > models.now_ms():
        hashes += (row.previous_secret_hash,)
    return token_from_row(row, list(scope)), hashes


async def list_tokens(
    conn: AsyncConnection, account_id: str
) -> list[tuple[models.Token, list[str]]]:
    rows = (
        await conn.execute(
            sa.select(T).where(T.c.account_id == account_id).order_by(T.c.created_at)
        )
    ).all()
    scopes = await conn.execute(
        sa.select(TB.c.key_id, TB.c.bucket_id, B.c.name).join(B, B.c.id == TB.c.bucket_id)
    )
    names: dict[str, list[tuple[str, str]]] = {}
    for key_id, bucket_id, bucket_name in scopes:
        names.setdefault(key_id, []).append((bucket_id, bucket_name))
    result = []
    for row in rows:
        pairs = sorted(names.get(row.key_id, []), key=lambda pair: pair[1])
        token = token_from_row(row, [bucket_id for bucket_id, _ in pairs])
        result.append((token, [name for _, name in pairs]))
    return result


async def revoke_token(conn: AsyncConnection, account_id: str, key_id: str) -> None:
    result = await conn.execute(
        T.update()
        .where(T.c.key_id == key_id, T.c.account_id == account_id, T.c.revoked_at.is_(None))
        .values(revoked_at=models.now_ms())
    )
    if result.rowcount != 1:
        raise errors.NotFound(f"no active token with key id {key_id!r}")


async def bind_token(
    conn: AsyncConnection, account_id: str, key_id: str, cert_sha256: str | None
) -> None:
    """Bind an active token to a client certificate's SHA-256, or unbind it (None)."""
    result = await conn.execute(
        T.update()
        .where(T.c.key_id == key_id, T.c.account_id == account_id, T.c.revoked_at.is_(None))
        .values(client_cert_sha256=cert_sha256)
    )
    if result.rowcount != 1:
        raise errors.NotFound(f"no active token with key id {key_id!r}")


async def rotate_token(
    conn: AsyncConnection, account_id: str, key_id: str, secret_hash: str, grace_ms: int
) -> models.Token:
    """Give an active token a new secret; the current one keeps working for `grace_ms`.

    A secret still in its grace from an earlier rotation stops working now.
    """
    found = await get_token(conn, key_id)
    if found is None or found[0].account_id != account_id or found[0].revoked_at is not None:
        raise errors.NotFound(f"no active token with key id {key_id!r}")
    until = models.now_ms() + grace_ms if grace_ms > 0 else None
    await conn.execute(
        T.update()
        .where(T.c.key_id == key_id)
        .values(
            secret_hash=secret_hash,
            previous_secret_hash=None if until is None else T.c.secret_hash,
            previous_valid_until=until,
        )
    )
    return dataclasses.replace(
        found[0], previous_valid_until=None if until is None else models.from_ms(until)
    )


async def touch_token(conn: AsyncConnection, key_id: str) -> None:
    await conn.execute(T.update().where(T.c.key_id == key_id).values(last_used_at=models.now_ms()))


async def audit(
    conn: AsyncConnection,
    *,
    actor: str,
    action: str,
    resource: str,
    result: str = "ok",
    source: str = "cli",
    detail: str | None = None,
) -> None:
    await conn.execute(
        tables.audit_log.insert().values(
            at=models.now_ms(),
            actor=actor[:200],
            action=action[:100],
            resource=resource[:200],
            result=result[:20],
            source=source[:100],
            detail=None if detail is None else detail[:2000],
        )
    )


async def bucket_names(conn: AsyncConnection, bucket_ids: Sequence[str]) -> dict[str, str]:
    rows = await conn.execute(sa.select(B.c.id, B.c.name).where(B.c.id.in_(bucket_ids)))
    return dict(rows.all())
