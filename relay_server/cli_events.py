"""Event commands: `event` (list, show decrypted, replay), `dlq` (list, show, replay with
filters) and `status`. Human tables by default, --json for scripts; changes are audited.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from relay_server import cli, console, errors, models
from relay_server.cli_admin import admin, audited
from relay_server.store import events as event_queries
from relay_server.store import sql
from relay_server.store.events import DeadFilter


def register(group: click.Group) -> None:
    for command in (event, dlq, status):
        group.add_command(command)


# ---- event -----------------------------------------------------------------------------


@click.group()
def event() -> None:
    """Stored webhooks: list, show (decrypted), replay."""


def _state_summary(e: models.EventSummary) -> str:
    return ",".join(f"{d.output}:{d.state}({d.attempts})" for d in e.deliveries) or "-"


def _event_rows(found: list[models.EventSummary]) -> list[tuple[str, ...]]:
    return [
        (
            e.id,
            console.format_time(e.received_at),
            e.bucket,
            e.method,
            e.path or "/",
            str(e.size),
            _state_summary(e),
        )
        for e in found
    ]


EVENT_HEADERS = ["ID", "RECEIVED", "BUCKET", "METHOD", "PATH", "BYTES", "DELIVERIES"]


@event.command("list")
@click.option("--bucket", "bucket_name", default=None)
@click.option("--input", "input_id", default=None)
@click.option(
    "--state",
    "delivery_state",
    type=click.Choice([s.value for s in models.DeliveryState]),
    default=None,
    help="Only events with a delivery in this state.",
)
@click.option("--since", default=None, help="Only events younger than this (e.g. 1h, 2d).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@admin
@click.pass_obj
def event_list(
    state: cli.CliState,
    bucket_name: str | None,
    input_id: str | None,
    delivery_state: str | None,
    since: str | None,
    limit: int,
    account_name: str,
    as_json: bool,
) -> None:
    since_ms = models.now_ms() - console.parse_duration_ms(since) if since else None

    async def action(store: sql.SqlStore) -> list[models.EventSummary]:
        acct = await store.get_account(account_name)
        bucket_id = (await store.get_bucket(acct.id, bucket_name)).id if bucket_name else None
        return await store.list_events(
            event_queries.EventFilter(
                account_id=acct.id,
                bucket_id=bucket_id,
                input_id=input_id,
                state=models.DeliveryState(delivery_state) if delivery_state else None,
                since_ms=since_ms,
                limit=limit,
            )
        )

    found = cli.run_with_store(state, action)
    console.emit_json(found) if as_json else console.table(_event_rows(found), EVENT_HEADERS)


@event.command("show")
@click.argument("event_id")
@click.option("--body-only", is_flag=True, help="Write just the raw body to stdout.")
@admin
@click.pass_obj
def event_show(
    state: cli.CliState, event_id: str, body_only: bool, account_name: str, as_json: bool
) -> None:
    async def action(store: sql.SqlStore) -> models.EventDetail:
        return await store.get_event((await store.get_account(account_name)).id, event_id)

    detail = cli.run_with_store(state, action, need_key=True)
    if body_only:
        sys.stdout.buffer.write(detail.body)
        return
    if as_json:
        payload = console.to_jsonable(detail)
        payload["body"] = detail.body.decode("utf-8", "replace")
        console.emit_json(payload)
        return
    _print_detail(detail)


def _print_detail(detail: models.EventDetail) -> None:
    s = detail.summary
    click.echo(f"event     {s.id}\nreceived  {console.format_time(s.received_at)} from {s.source}")
    click.echo(f"bucket    {s.bucket}   input {s.input_id}")
    click.echo(f"request   {s.method} {s.path or '/'}{'?' + detail.query if detail.query else ''}")
    click.echo("headers")
    for name, value in detail.headers:
        click.echo(f"  {name}: {value}")
    text = detail.body.decode("utf-8", "replace")
    click.echo(f"body ({s.size} bytes)\n  {text[:4000]}{' …' if len(text) > 4000 else ''}")
    click.echo("deliveries")
    for d in s.deliveries:
        click.echo(
            f"  {d.id} {d.output}: {d.state}, attempts {d.attempts}"
            + (f", last error: {d.last_error}" if d.last_error else "")
            + (" (replay)" if d.replay else "")
        )
    click.echo("attempts")
    for a in detail.attempts:
        click.echo(
            f"  #{a.attempt} {console.format_time(a.ended_at)} {a.outcome} by {a.agent}"
            + (f": {a.error}" if a.error else "")
        )


@event.command("replay")
@click.argument("event_id")
@click.option("--output", default=None, help="Only this output (default: all).")
@admin
@click.pass_obj
def event_replay(
    state: cli.CliState, event_id: str, output: str | None, account_name: str, as_json: bool
) -> None:
    async def action(store: sql.SqlStore) -> list[str]:
        created = await store.replay_event(
            (await store.get_account(account_name)).id, event_id, output
        )
        await audited(store, "event.replay", f"event:{event_id}")
        return created

    created = cli.run_with_store(state, action)
    if as_json:
        console.emit_json({"event_id": event_id, "deliveries": created})
    else:
        click.echo(f"replaying event {event_id}: {len(created)} new delivery(ies)")


# ---- dlq -------------------------------------------------------------------------------


@click.group()
def dlq() -> None:
    """The dead-letter queue: deliveries that ran out of attempts or were rejected."""


def dead_filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--bucket, --input, --older-than, --newer-than and --error for DLQ commands."""

    @click.option("--bucket", "bucket_name", default=None, help="Only this bucket.")
    @click.option("--input", "input_id", default=None, help="Only events of this input.")
    @click.option("--older-than", default=None, help="Only events older than this (e.g. 1h).")
    @click.option("--newer-than", default=None, help="Only events younger than this (e.g. 2d).")
    @click.option("--error", default=None, help="Last error contains this (any case).")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True, slots=True)
class DeadOptions:
    bucket_name: str | None
    input_id: str | None
    older_than: str | None
    newer_than: str | None
    error: str | None

    def ages_ms(self) -> tuple[int | None, int | None]:
        """(received before, received after) in epoch ms, from the age options."""
        now = models.now_ms()
        before = now - console.parse_duration_ms(self.older_than) if self.older_than else None
        after = now - console.parse_duration_ms(self.newer_than) if self.newer_than else None
        return before, after

    async def where(self, store: sql.SqlStore, account_id: str, limit: int) -> DeadFilter:
        bucket_id = None
        if self.bucket_name:
            bucket_id = (await store.get_bucket(account_id, self.bucket_name)).id
        before, after = self.ages_ms()
        return DeadFilter(
            account_id=account_id,
            bucket_id=bucket_id,
            input_id=self.input_id,
            received_before_ms=before,
            received_after_ms=after,
            error=self.error,
            limit=limit,
        )


def _dead_rows(found: list[models.EventSummary]) -> list[tuple[str, ...]]:
    return [
        (
            e.id,
            console.format_time(e.received_at),
            e.bucket,
            e.input_id,
            d.output,
            str(d.attempts),
            (d.last_error or "")[:60],
        )
        for e in found
        for d in e.deliveries
        if d.state is models.DeliveryState.DEAD
    ]


@dlq.command("list")
@dead_filters
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@admin
@click.pass_obj
def dlq_list(
    state: cli.CliState,
    bucket_name: str | None,
    input_id: str | None,
    older_than: str | None,
    newer_than: str | None,
    error: str | None,
    limit: int,
    account_name: str,
    as_json: bool,
) -> None:
    options = DeadOptions(bucket_name, input_id, older_than, newer_than, error)
    options.ages_ms()  # bad durations are usage errors, before touching the database

    async def action(store: sql.SqlStore) -> list[models.EventSummary]:
        acct = await store.get_account(account_name)
        return await store.list_dead(await options.where(store, acct.id, limit))

    found = cli.run_with_store(state, action)
    if as_json:
        console.emit_json(found)
        return
    console.table(
        _dead_rows(found),
        ["EVENT", "RECEIVED", "BUCKET", "INPUT", "OUTPUT", "ATTEMPTS", "LAST ERROR"],
    )


@dlq.command("show")
@click.argument("event_id")
@admin
@click.pass_obj
def dlq_show(state: cli.CliState, event_id: str, account_name: str, as_json: bool) -> None:
    """A dead event: its dead deliveries with their attempts, and the decrypted request."""

    async def action(store: sql.SqlStore) -> tuple[models.EventDetail, set[str]]:
        acct = await store.get_account(account_name)
        where = DeadFilter(account_id=acct.id, event_id=event_id, limit=1_000)
        dead = {delivery_id for delivery_id, _, _ in await store.dead_deliveries(where)}
        if not dead:
            raise errors.NotFound(f"no dead delivery for event {event_id}")
        return await store.get_event(acct.id, event_id), dead

    detail, dead = cli.run_with_store(state, action, need_key=True)
    deliveries = [d for d in detail.summary.deliveries if d.id in dead]
    if as_json:
        event_json = console.to_jsonable(detail)
        event_json["body"] = detail.body.decode("utf-8", "replace")
        console.emit_json(
            {"dead": [_dead_json(d, detail) for d in deliveries], "event": event_json}
        )
        return
    click.echo("dead deliveries")
    for d in deliveries:
        click.echo(f"  {d.id} {d.output}: {d.attempts} attempt(s), last error: {d.last_error}")
        for a in detail.attempts:
            if a.delivery_id == d.id:
                click.echo(f"    #{a.attempt} {_attempt_text(a)}")
    click.echo()
    _print_detail(detail)


def _attempt_text(a: models.AttemptInfo) -> str:
    return f"{console.format_time(a.ended_at)} {a.outcome} by {a.agent}" + (
        f": {a.error}" if a.error else ""
    )


def _dead_json(d: models.DeliveryInfo, detail: models.EventDetail) -> dict[str, Any]:
    attempts = [a for a in detail.attempts if a.delivery_id == d.id]
    return {**console.to_jsonable(d), "attempt_log": console.to_jsonable(attempts)}


@dlq.command("replay")
@click.argument("event_id", required=False)
@click.option("--all", "replay_all", is_flag=True, help="Replay every (matching) dead delivery.")
@dead_filters
@click.option("--dry-run", is_flag=True, help="With --all: only count what would be replayed.")
@admin
@click.pass_obj
def dlq_replay(
    state: cli.CliState,
    event_id: str | None,
    replay_all: bool,
    bucket_name: str | None,
    input_id: str | None,
    older_than: str | None,
    newer_than: str | None,
    error: str | None,
    dry_run: bool,
    account_name: str,
    as_json: bool,
) -> None:
    options = DeadOptions(bucket_name, input_id, older_than, newer_than, error)
    _check_replay_usage(event_id, replay_all, options, dry_run)
    options.ages_ms()

    async def action(store: sql.SqlStore) -> list[str]:
        acct = await store.get_account(account_name)
        if event_id:
            return await _replay_one(store, acct.id, event_id)
        where = await options.where(store, acct.id, REPLAY_LIMIT)
        if dry_run:
            return [delivery_id for delivery_id, _, _ in await store.dead_deliveries(where)]
        created = await store.replay_dead(where)
        detail = ",".join(f"{k}={v}" for k, v in vars_of(options).items() if v)
        await audited(
            store,
            "dlq.replay",
            f"bucket:{bucket_name or '*'}",
            f"deliveries={len(created)}" + (f" {detail}" if detail else ""),
        )
        return created

    found = cli.run_with_store(state, action)
    _report_replay(found, dry_run=dry_run, as_json=as_json)


REPLAY_LIMIT = 100_000


def vars_of(options: DeadOptions) -> dict[str, str | None]:
    return {
        "input": options.input_id,
        "older_than": options.older_than,
        "newer_than": options.newer_than,
        "error": options.error,
    }


def _check_replay_usage(
    event_id: str | None, replay_all: bool, options: DeadOptions, dry_run: bool
) -> None:
    if bool(event_id) == replay_all:
        raise click.UsageError("give one EVENT_ID, or --all (optionally with filters)")
    if event_id and (dry_run or any(vars_of(options).values()) or options.bucket_name):
        raise click.UsageError("filters and --dry-run go with --all, not with an EVENT_ID")


async def _replay_one(store: sql.SqlStore, account_id: str, event_id: str) -> list[str]:
    dead = await store.dead_deliveries(
        DeadFilter(account_id=account_id, event_id=event_id, limit=1_000)
    )
    if not dead:
        raise errors.NotFound(f"event {event_id} has no dead delivery")
    created = await store.replay_event(account_id, event_id)
    await audited(store, "dlq.replay", f"event:{event_id}", f"deliveries={len(created)}")
    return created


def _report_replay(found: list[str], *, dry_run: bool, as_json: bool) -> None:
    if as_json:
        key = "would_replay" if dry_run else "deliveries"
        console.emit_json({key: found, "count": len(found), "dry_run": dry_run})
    elif dry_run:
        click.echo(f"would replay {len(found)} dead delivery(ies); nothing changed (--dry-run)")
    else:
        click.echo(f"replayed {len(found)} dead delivery(ies); they are queued again")


# ---- status ----------------------------------------------------------------------------


@click.command("status")
@admin
@click.pass_obj
def status(state: cli.CliState, account_name: str, as_json: bool) -> None:
    """The database, delivery counts, the oldest pending event and disk use."""

    async def action(store: sql.SqlStore) -> sql.StoreStatus:
        return await store.status((await store.get_account(account_name)).id)

    found = cli.run_with_store(state, action)
    report = _status_report(found, state.key_file, account_name)
    console.emit_json(report) if as_json else _print_status(report)


def _status_report(found: sql.StoreStatus, key_file: pathlib.Path, account: str) -> dict[str, Any]:
    oldest = found.oldest_pending_ms
    files = [_disk_entry(path, size) for path, size in found.database_files.items()]
    key_dir = key_file.resolve().parent
    return {
        "database_url": found.database_url,
        "schema_revision": found.schema_revision,
        "account": account,
        "deliveries": found.deliveries,
        "oldest_pending_age_ms": None if oldest is None else max(0, models.now_ms() - oldest),
        "disk": {
            "database_files": files,
            "database_bytes": sum(f["bytes"] for f in files),
            "database_human": console.format_bytes(sum(f["bytes"] for f in files)),
            "key_folder": _disk_entry(str(key_dir), _folder_bytes(key_dir)),
        },
    }


def _disk_entry(path: str, size: int) -> dict[str, Any]:
    return {"path": path, "bytes": size, "human": console.format_bytes(size)}


def _folder_bytes(folder: pathlib.Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size if path.is_file() else 0
    return total


def _print_status(report: dict[str, Any]) -> None:
    age = report["oldest_pending_age_ms"]
    click.echo(f"database        {report['database_url']}")
    click.echo(f"schema          {report['schema_revision'] or '-'}")
    click.echo(f"account         {report['account']}")
    counts = report["deliveries"]
    click.echo("deliveries      " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    click.echo(f"oldest pending  {'-' if age is None else console.format_age_ms(age)}")
    disk = report["disk"]
    for entry in disk["database_files"]:
        click.echo(f"disk            {entry['human']:>10}  {entry['path']}")
    if disk["database_files"]:
        click.echo(f"database total  {disk['database_human']:>10}")
    key_folder = disk["key_folder"]
    click.echo(f"key folder      {key_folder['human']:>10}  {key_folder['path']}")
