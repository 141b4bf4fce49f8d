"""`relay-server audit list`: the audit log, newest first, with filters.

Every admin command that changes something writes one entry (`cli_admin.audited`), as do
agent connects (refused ones with result `denied`, under the key id only), disconnects
and key rotations. Entries hold ids, names and settings, never secrets or bodies.
"""

from __future__ import annotations

import click

from relay_server import cli, console, models
from relay_server.store import audit_log, sql


def register(group: click.Group) -> None:
    group.add_command(audit)


@click.group()
def audit() -> None:
    """The audit log: who did what to which resource, when, from where, with what result."""


@audit.command("list")
@click.option("--action", "action_prefix", help="Action or its prefix: token, agent.connect.")
@click.option("--actor", help="Who: cli:<user>, or an agent token's key id.")
@click.option("--resource", help="Text the resource contains: bucket:github, shk_..., key:k2.")
@click.option("--result", type=click.Choice(audit_log.RESULTS), help="Outcome.")
@click.option("--since", metavar="DURATION", help="Only entries newer than this: 1h, 7d.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def audit_list(
    state: cli.CliState,
    action_prefix: str | None,
    actor: str | None,
    resource: str | None,
    result: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Audit entries, newest first."""
    since_ms = None if since is None else models.now_ms() - console.parse_duration_ms(since)
    where = audit_log.AuditFilter(
        action_prefix=action_prefix,
        actor=actor,
        resource=resource,
        result=result,
        since_ms=since_ms,
        limit=limit,
    )

    async def action(store: sql.SqlStore) -> list[audit_log.AuditEntry]:
        return await store.list_audit(where)

    found = cli.run_with_store(state, action)
    if as_json:
        console.emit_json(found)
        return
    console.table(
        [
            (
                console.format_time(e.at),
                e.actor,
                e.action,
                e.resource,
                e.result,
                e.source,
                e.detail or "",
            )
            for e in found
        ],
        ["WHEN (UTC)", "ACTOR", "ACTION", "RESOURCE", "RESULT", "SOURCE", "DETAIL"],
    )
