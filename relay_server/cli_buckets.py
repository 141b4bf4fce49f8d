"""Bucket and output commands: a bucket's retry, retention and dedup policy; its outputs.

Each prints a table by default and JSON with --json. Every change is audited.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import click

from relay_server import cli, console, models
from relay_server.cli_admin import admin, audited, owned_bucket
from relay_server.ingress import answers, signatures
from relay_server.store import sql


def register(group: click.Group) -> None:
    for command in (bucket, output):
        group.add_command(command)


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The bucket policy flags; each left out keeps the current (or default) value."""
    defaults = models.BucketPolicy()

    def duration(name: str, what: str, default_ms: int) -> Callable[..., Any]:
        return click.option(
            name,
            metavar="DURATION",
            help=f"{what} [default: {console.format_duration_ms(default_ms)}].",
        )

    decorators = [
        click.option(
            "--max-attempts",
            type=click.IntRange(1, 10_000),
            help=f"Dead-letter after this many attempts [default: {defaults.max_attempts}].",
        ),
        duration(
            "--max-age",
            "Dead-letter a delivery this long after its first attempt",
            defaults.max_age_ms,
        ),
        duration(
            "--retention",
            "Delete events this long after they arrived, once settled",
            defaults.retention_ms,
        ),
        duration(
            "--dlq-retention",
            "Keep dead-lettered deliveries this long after they died",
            defaults.dlq_retention_ms,
        ),
        click.option(
            "--dedup-header",
            "dedup_headers",
            multiple=True,
            metavar="NAME",
            help="A header whose value identifies the provider's event; repeat for several "
            f"(the first present wins) [default: {', '.join(defaults.dedup_headers)}].",
        ),
        click.option(
            "--dedup-preset",
            "dedup_presets",
            multiple=True,
            type=click.Choice(sorted(models.DEDUP_PRESETS)),
            help="Also deduplicate on a provider's id header: "
            + ", ".join(f"{k} ({v})" for k, v in sorted(models.DEDUP_PRESETS.items()))
            + ".",
        ),
        click.option("--no-dedup", is_flag=True, help="Turn deduplication off."),
        duration(
            "--dedup-window",
            "Answer a repeated provider event id as a duplicate for this long",
            defaults.dedup_window_ms,
        ),
        click.option(
            "--ephemeral/--durable",
            default=None,
            help="Ephemeral: body, headers, query and path stay in the server's memory, never "
            "in the database; a restart loses undelivered events [default: durable].",
        ),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


def apply_policy(base: models.BucketPolicy, options: dict[str, Any]) -> models.BucketPolicy:
    """`base` with the given policy flags applied; click.UsageError on nonsense."""
    changes: dict[str, Any] = {}
    if options["max_attempts"] is not None:
        changes["max_attempts"] = options["max_attempts"]
    if options["ephemeral"] is not None:
        changes["ephemeral"] = options["ephemeral"]
    for flag, field in (
        ("max_age", "max_age_ms"),
        ("retention", "retention_ms"),
        ("dlq_retention", "dlq_retention_ms"),
        ("dedup_window", "dedup_window_ms"),
    ):
        if options[flag] is not None:
            changes[field] = console.parse_duration_ms(options[flag])
    headers = _dedup_headers(base, options)
    if headers is not None:
        changes["dedup_headers"] = headers
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _dedup_headers(base: models.BucketPolicy, options: dict[str, Any]) -> tuple[str, ...] | None:
    named, presets = options["dedup_headers"], options["dedup_presets"]
    if options["no_dedup"]:
        if named or presets:
            raise click.UsageError("--no-dedup cannot be combined with --dedup-header/-preset")
        return ()
    if not named and not presets:
        return None
    for name in named:
        if not answers.HEADER_NAME.match(name):
            raise click.UsageError(f"{name!r} is not a header name")
    wanted = [*(named or base.dedup_headers), *(models.DEDUP_PRESETS[p] for p in presets)]
    unique: dict[str, str] = {}
    for name in wanted:
        unique.setdefault(name.lower(), name)
    return tuple(unique.values())


def _policy_options(options: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "max_attempts",
        "max_age",
        "retention",
        "dlq_retention",
        "dedup_headers",
        "dedup_presets",
        "no_dedup",
        "dedup_window",
        "ephemeral",
    )
    return {key: options.pop(key) for key in keys}


# ---- bucket ----------------------------------------------------------------------------


@click.group()
def bucket() -> None:
    """Groups of inputs and outputs with one retry, retention and dedup policy."""


@bucket.command("create")
@click.argument("name")
@policy_options
@admin
@click.pass_obj
def bucket_create(state: cli.CliState, /, name: str, **options: Any) -> None:
    account_name, as_json = options.pop("account_name"), options.pop("as_json")
    policy = apply_policy(models.BucketPolicy(), _policy_options(options))

    async def action(store: sql.SqlStore) -> models.Bucket:
        acct = await store.get_account(account_name)
        created = await store.create_bucket(acct.id, name, policy)
        await audited(store, "bucket.create", f"bucket:{name}")
        return created

    created = cli.run_with_store(state, action)
    console.emit_json(created) if as_json else click.echo(f"created bucket {created.name}")


@bucket.command("update")
@click.argument("name")
@policy_options
@admin
@click.pass_obj
def bucket_update(state: cli.CliState, /, name: str, **options: Any) -> None:
    """Change a bucket's policy; it applies to stored events too."""
    account_name, as_json = options.pop("account_name"), options.pop("as_json")
    flags = _policy_options(options)

    async def action(store: sql.SqlStore) -> models.Bucket:
        found = await owned_bucket(store, account_name, name)
        updated = await store.update_bucket(found, apply_policy(found.policy, flags))
        await audited(store, "bucket.update", f"bucket:{name}", _changes(found, updated))
        return updated

    updated = cli.run_with_store(state, action)
    if as_json:
        console.emit_json(updated)
    else:
        click.echo(f"updated bucket {name}")
        _print_policy(updated.policy)


def _changes(before: models.Bucket, after: models.Bucket) -> str:
    old, new = dataclasses.asdict(before.policy), dataclasses.asdict(after.policy)
    return ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if old[k] != new[k]) or "none"


def _bucket_row(b: models.Bucket) -> tuple[str, ...]:
    p = b.policy
    return (
        b.name,
        str(p.max_attempts),
        console.format_duration_ms(p.max_age_ms),
        console.format_duration_ms(p.retention_ms),
        console.format_duration_ms(p.dlq_retention_ms),
        f"{', '.join(p.dedup_headers)} ({console.format_duration_ms(p.dedup_window_ms)})"
        if p.dedup_headers
        else "off",
        console.format_time(b.created_at),
    )


BUCKET_COLUMNS = ["NAME", "MAX ATTEMPTS", "MAX AGE", "RETENTION", "DLQ RETENTION", "DEDUP"]


@bucket.command("list")
@admin
@click.pass_obj
def bucket_list(state: cli.CliState, account_name: str, as_json: bool) -> None:
    async def action(store: sql.SqlStore) -> list[models.Bucket]:
        return await store.list_buckets((await store.get_account(account_name)).id)

    found = cli.run_with_store(state, action)
    if as_json:
        console.emit_json(found)
        return
    console.table([_bucket_row(b) for b in found], [*BUCKET_COLUMNS, "CREATED"])


PAYLOADS = {
    False: "sealed in the database (durable)",
    True: "in server memory only (ephemeral: a restart loses undelivered events)",
}


def _print_policy(p: models.BucketPolicy) -> None:
    dedup = (
        f"on {', '.join(p.dedup_headers)} for {console.format_duration_ms(p.dedup_window_ms)}"
        if p.dedup_headers
        else "off"
    )
    click.echo(
        f"retry: up to {p.max_attempts} attempts within "
        f"{console.format_duration_ms(p.max_age_ms)}\n"
        f"retention: events {console.format_duration_ms(p.retention_ms)}, "
        f"dead letters {console.format_duration_ms(p.dlq_retention_ms)}\n"
        f"dedup: {dedup}\n"
        f"payloads: {PAYLOADS[p.ephemeral]}"
    )


@bucket.command("show")
@click.argument("name")
@admin
@click.pass_obj
def bucket_show(state: cli.CliState, name: str, account_name: str, as_json: bool) -> None:
    async def action(
        store: sql.SqlStore,
    ) -> tuple[models.Bucket, dict[str, int], list[Any], list[models.Output]]:
        acct = await store.get_account(account_name)
        found = await store.get_bucket(acct.id, name)
        return (
            found,
            await store.bucket_counts(found.id),
            await store.list_inputs(acct.id, found.id),
            await store.list_outputs(found),
        )

    found, counts, inputs, outputs = cli.run_with_store(state, action)
    urls = [f"{state.public_base()}/in/{i.id}" for i, _ in inputs]
    if as_json:
        console.emit_json(
            {
                **console.to_jsonable(found),
                "counts": counts,
                "input_urls": urls,
                "outputs": console.to_jsonable(outputs),
            }
        )
        return
    click.echo(f"bucket {found.name}")
    _print_policy(found.policy)
    click.echo(f"input auth: {models.describe_auth(found.input_auth)}")
    click.echo(
        "deliveries: "
        + ", ".join(f"{s} {counts.get(s, 0)}" for s in models.DeliveryState)
        + f"; events {counts['events']}"
    )
    for o in outputs:
        click.echo(f"output: {o.name}{' (ordered)' if o.ordered else ''}")
    for (found_input, _), url in zip(inputs, urls, strict=True):
        click.echo(f"input: {url} (signatures: {signatures.describe(found_input.verification)})")


@bucket.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even with undelivered events.")
@admin
@click.pass_obj
def bucket_delete(
    state: cli.CliState, name: str, force: bool, account_name: str, as_json: bool
) -> None:
    async def action(store: sql.SqlStore) -> None:
        found = await owned_bucket(store, account_name, name)
        await store.delete_bucket(found, force=force)
        await audited(store, "bucket.delete", f"bucket:{name}", "force" if force else None)

    cli.run_with_store(state, action)
    console.emit_json({"deleted": name}) if as_json else click.echo(f"deleted bucket {name}")


# ---- output ----------------------------------------------------------------------------


@click.group()
def output() -> None:
    """Where a bucket's events go: each output gets its own copy of every new event."""


def in_bucket(fn: Callable[..., Any]) -> Callable[..., Any]:
    @click.option("--bucket", "bucket_name", required=True, help="The bucket.")
    @admin
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def _output_rows(found: list[models.Output]) -> list[tuple[str, ...]]:
    return [
        (o.name, str(o.kind), "yes" if o.ordered else "no", console.format_time(o.created_at))
        for o in found
    ]


OUTPUT_COLUMNS = ["NAME", "KIND", "ORDERED", "CREATED"]


@output.command("list")
@in_bucket
@click.pass_obj
def output_list(state: cli.CliState, bucket_name: str, account_name: str, as_json: bool) -> None:
    async def action(store: sql.SqlStore) -> list[models.Output]:
        return await store.list_outputs(await owned_bucket(store, account_name, bucket_name))

    found = cli.run_with_store(state, action)
    if as_json:
        console.emit_json(found)
    else:
        console.table(_output_rows(found), OUTPUT_COLUMNS)


ORDERED_HELP = (
    "Ordered: one delivery in flight at a time, oldest first; a failing event holds the "
    "line until it is delivered or dead-lettered."
)


@output.command("create")
@click.argument("name")
@click.option("--ordered/--unordered", default=False, show_default=True, help=ORDERED_HELP)
@in_bucket
@click.pass_obj
def output_create(
    state: cli.CliState,
    name: str,
    ordered: bool,
    bucket_name: str,
    account_name: str,
    as_json: bool,
) -> None:
    """Add an output; it gets events that arrive from now on (replay reaches older ones)."""

    async def action(store: sql.SqlStore) -> models.Output:
        found = await owned_bucket(store, account_name, bucket_name)
        created = await store.create_output(found, name, ordered=ordered)
        await audited(store, "output.create", f"output:{bucket_name}/{name}")
        return created

    created = cli.run_with_store(state, action)
    if as_json:
        console.emit_json(created)
    else:
        click.echo(f"created output {name} in {bucket_name}" + (" (ordered)" if ordered else ""))


@output.command("update")
@click.argument("name")
@click.option("--ordered/--unordered", required=True, help=ORDERED_HELP)
@in_bucket
@click.pass_obj
def output_update(
    state: cli.CliState,
    name: str,
    ordered: bool,
    bucket_name: str,
    account_name: str,
    as_json: bool,
) -> None:
    async def action(store: sql.SqlStore) -> models.Output:
        found = await owned_bucket(store, account_name, bucket_name)
        updated = await store.set_output_ordered(found, name, ordered=ordered)
        await audited(store, "output.update", f"output:{bucket_name}/{name}", f"ordered={ordered}")
        return updated

    updated = cli.run_with_store(state, action)
    if as_json:
        console.emit_json(updated)
    else:
        click.echo(f"output {name} in {bucket_name} is now {'' if ordered else 'un'}ordered")


@output.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even with undelivered events.")
@in_bucket
@click.pass_obj
def output_delete(
    state: cli.CliState,
    name: str,
    force: bool,
    bucket_name: str,
    account_name: str,
    as_json: bool,
) -> None:
    async def action(store: sql.SqlStore) -> None:
        found = await owned_bucket(store, account_name, bucket_name)
        await store.delete_output(found, name, force=force)
        await audited(
            store, "output.delete", f"output:{bucket_name}/{name}", "force" if force else None
        )

    cli.run_with_store(state, action)
    if as_json:
        console.emit_json({"deleted": name, "bucket": bucket_name})
    else:
        click.echo(f"deleted output {name} from {bucket_name}")
