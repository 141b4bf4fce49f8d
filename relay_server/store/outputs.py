"""A bucket's outputs: where its events go. Each new event gets one delivery per output."""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import errors, ids, models
from relay_server.store import tables

OUT, D = tables.outputs, tables.deliveries


def output_from_row(row: Any) -> models.Output:
    return models.Output(
        id=row.id,
        bucket_id=row.bucket_id,
        name=row.name,
        kind=models.OutputKind(row.kind),
        ordered=bool(row.ordered),
        created_at=models.from_ms(row.created_at),
    )


async def create_output(
    conn: AsyncConnection, bucket: models.Bucket, name: str, *, ordered: bool
) -> models.Output:
    """A new agent output; it receives events stored from now on (replay reaches older ones)."""
    taken = sa.select(OUT.c.id).where(OUT.c.bucket_id == bucket.id, OUT.c.name == name)
    if (await conn.execute(taken)).first():
        raise errors.Conflict(f"bucket {bucket.name!r} already has an output {name!r}")
    output = models.Output(
        id=ids.new_id(),
        bucket_id=bucket.id,
        name=name,
        kind=models.OutputKind.AGENT,
        ordered=ordered,
        created_at=models.from_ms(models.now_ms()),
    )
    await conn.execute(
        OUT.insert().values(
            id=output.id,
            bucket_id=bucket.id,
            name=name,
            kind=output.kind,
            ordered=ordered,
            created_at=models.to_ms(output.created_at),
        )
    )
    return output


async def get_output(conn: AsyncConnection, bucket: models.Bucket, name: str) -> models.Output:
    row = (
        await conn.execute(sa.select(OUT).where(OUT.c.bucket_id == bucket.id, OUT.c.name == name))
    ).first()
    if row is None:
        raise errors.NotFound(f"bucket {bucket.name!r} has no output {name!r}")
    return output_from_row(row)


async def list_outputs(conn: AsyncConnection, bucket: models.Bucket) -> list[models.Output]:
    query = sa.select(OUT).where(OUT.c.bucket_id == bucket.id).order_by(OUT.c.name)
    return [output_from_row(row) for row in await conn.execute(query)]


async def set_ordered(
    conn: AsyncConnection, bucket: models.Bucket, name: str, *, ordered: bool
) -> models.Output:
    output = await get_output(conn, bucket, name)
    await conn.execute(OUT.update().where(OUT.c.id == output.id).values(ordered=ordered))
    return dataclasses.replace(output, ordered=ordered)


async def delete_output(
    conn: AsyncConnection, bucket: models.Bucket, name: str, *, force: bool
) -> None:
    """Remove an output and its deliveries; refuses while it has undelivered ones."""
    output = await get_output(conn, bucket, name)
    waiting = await conn.scalar(
        sa.select(sa.func.count())
        .select_from(D)
        .where(
            D.c.output_id == output.id,
            D.c.state.in_([models.DeliveryState.PENDING, models.DeliveryState.LEASED]),
        )
    )
    if waiting and not force:
        raise errors.Conflict(
            f"output {name!r} still has {waiting} undelivered events; "
            "use --force to delete them too"
        )
    remaining = await conn.scalar(
        sa.select(sa.func.count()).select_from(OUT).where(OUT.c.bucket_id == bucket.id)
    )
    if remaining == 1:
        raise errors.Conflict(f"output {name!r} is the bucket's last one; events need somewhere")
    await conn.execute(OUT.delete().where(OUT.c.id == output.id))
