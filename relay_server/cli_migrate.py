"""`relay-server migrate-data`: move an installation to another database, e.g. onto PostgreSQL.

The copying and verifying live in relay_server.migrate_data; this module parses the
command line, reports progress on stderr, prints the verification table and audits the
run in the target database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import click

from relay_server import cli, cli_admin, console, migrate_data
from relay_server.store import database, sql


def register(group: click.Group) -> None:
    group.add_command(migrate_data_command)


@click.command("migrate-data")
@click.option(
    "--from",
    "source_url",
    required=True,
    metavar="URL",
    help="The database to copy from, e.g. sqlite:///var/stowhook.db (its relay stopped).",
)
@click.option(
    "--to",
    "target_url",
    metavar="URL",
    help="The database to copy into, e.g. postgresql://stowhook@db/stowhook "
    "[default: --database-url].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=migrate_data.DEFAULT_BATCH_ROWS,
    show_default=True,
    help="Rows copied per transaction.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Copy even if the target holds accounts the source does not have.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verification as JSON.")
@click.pass_obj
def migrate_data_command(
    state: cli.CliState,
    source_url: str,
    target_url: str | None,
    batch_size: int,
    force: bool,
    as_json: bool,
) -> None:
    """Copy every account, token, bucket, input, output, event (still sealed), delivery,
    attempt and audit entry from --from into --to, then verify every table.

    Both schemas are migrated first. Deliveries an agent of the old relay held go back to
    pending, so the new relay delivers them; delivered and dead ones stay as they are.
    Rerunning it copies only what is missing. Start the new relay with the same key file.
    Exits non-zero if a source row is missing from the target.
    """
    target_url = target_url or state.database_url
    with cli.reported_errors():
        migrate_data.check_urls(source_url, target_url)
        base = state.database()
        source = sql.SqlStore(dataclasses.replace(base, url=source_url), None)
        target = sql.SqlStore(dataclasses.replace(base, url=target_url), None)
        outcome = asyncio.run(_run(source, target, batch_size=batch_size, force=force))
    if as_json:
        console.emit_json({"ok": outcome.ok, "copied": outcome.copied, "tables": outcome.tables})
    else:
        console.table(
            [
                (
                    c.table,
                    c.source,
                    c.target,
                    c.copied,
                    "ok" if c.ok else f"MISSING {c.source - c.present}",
                )
                for c in outcome.tables
            ],
            ["TABLE", "SOURCE", "TARGET", "COPIED", "CHECK"],
        )
    if not outcome.ok:
        raise cli.RelayCliError("verification failed: source rows are missing from the target")
    if not as_json:
        click.echo(
            f"copied {outcome.copied} rows to {database.redact_url(target_url)}; "
            "start relay-server on it with the same key file"
        )


async def _run(
    source: sql.SqlStore, target: sql.SqlStore, *, batch_size: int, force: bool
) -> migrate_data.Outcome:
    await source.migrate()
    await target.migrate()
    await source.open()
    await target.open()
    try:
        outcome = await migrate_data.migrate_data(
            source.db, target.db, batch_rows=batch_size, force=force, progress=_Progress()
        )
        await cli_admin.audited(
            target,
            "data.migrate",
            f"database:{database.redact_url(target.db.settings.url)}",
            f"from {database.redact_url(source.db.settings.url)}; copied {outcome.copied} "
            f"rows; verified {'ok' if outcome.ok else 'with missing rows'}",
            result="ok" if outcome.ok else "error",
        )
        return outcome
    finally:
        await source.close()
        await target.close()


class _Progress:
    """`events: 1500/3000` on stderr, at most once a second per table, and when it is done."""

    def __init__(self) -> None:
        self._shown = 0.0

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._shown >= 1.0:
            self._shown = now
            click.echo(f"{table}: {done}/{total}", err=True)
