"""Reading the audit log: who did what to which resource, when, from where, with what result.

Entries are written by `admin.audit` (CLI commands, agent connects and disconnects, key
rotation) and never hold secrets or bodies: ids, names and settings only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay_server import models
from relay_server.store import tables

RESULTS = ("ok", "denied", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    id: int
    at: dt.datetime
    actor: str  # cli:<user>, or the agent token's key id
    action: str  # e.g. token.create, agent.connect, keys.rotate
    resource: str  # e.g. token:shk_..., bucket:github, key:k2
    result: str  # ok, denied or error
    source: str  # the CLI's host name, or the agent's peer address
    detail: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditFilter:
    action_prefix: str | None = None  # "token" matches token.create, token.revoke, ...
    actor: str | None = None
    resource: str | None = None  # contained in the resource: "github" matches bucket:github
    result: str | None = None
    since_ms: int | None = None  # entries at or after this time
    limit: int = 100


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def list_entries(conn: AsyncConnection, where: AuditFilter) -> list[AuditEntry]:
    """The matching entries, newest first."""
    log = tables.audit_log
    query = sa.select(log).order_by(log.c.at.desc(), log.c.id.desc()).limit(where.limit)
    if where.action_prefix:
        prefix = where.action_prefix.rstrip(".")
        query = query.where(
            sa.or_(
                log.c.action == prefix,
                log.c.action.like(_escape_like(prefix) + ".%", escape="\\"),
            )
        )
    if where.resource:
        query = query.where(log.c.resource.like(f"%{_escape_like(where.resource)}%", escape="\\"))
    for column, value in ((log.c.actor, where.actor), (log.c.result, where.result)):
        if value:
            query = query.where(column == value)
    if where.since_ms is not None:
        query = query.where(log.c.at >= where.since_ms)
    return [
        AuditEntry(
            id=row.id,
            at=models.from_ms(row.at),
            actor=row.actor,
            action=row.action,
            resource=row.resource,
            result=row.result,
            source=row.source,
            detail=row.detail,
        )
        for row in await conn.execute(query)
    ]
