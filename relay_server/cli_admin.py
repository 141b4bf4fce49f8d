"""Administration commands: account, token, input (bucket and output: cli_buckets).

Each prints a table by default and JSON with --json. Every change is audited.
"""

from __future__ import annotations

import functools
import getpass
import socket
from collections.abc import Callable
from typing import Any

import click

from relay_server import auth, cli, console, models
from relay_server.ingress import answers, signatures
from relay_server.store import sql


def register(group: click.Group) -> None:
    for command in (account, token, input_):
        group.add_command(command)


def admin(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--account and --json for a command that works in one account."""

    @click.option(
        "--account",
        "account_name",
        default="default",
        show_default=True,
        envvar="STOWHOOK_ACCOUNT",
        help="Account to work in.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def owned_bucket(store: sql.SqlStore, account_name: str, name: str) -> models.Bucket:
    """The account's bucket `name`; NotFound otherwise."""
    return await store.get_bucket((await store.get_account(account_name)).id, name)


async def owned_input(store: sql.SqlStore, account_name: str, input_id: str) -> models.Input:
    """Input `input_id` if it belongs to the account; NotFound otherwise."""
    return await store.get_input((await store.get_account(account_name)).id, input_id)


async def audited(
    store: sql.SqlStore,
    action: str,
    resource: str,
    detail: str | None = None,
    *,
    result: str = "ok",
) -> None:
    """One audit entry for this command: who (cli:<user>), from where (this host), what.

    `detail` must never hold a secret or a body: ids, names and settings only.
    """
    await store.audit(
        actor=actor(),
        action=action,
        resource=resource,
        detail=detail,
        result=result,
        source=socket.gethostname() or "cli",
    )


# ---- account ---------------------------------------------------------------------------


@click.group()
def account() -> None:
    """Tenants; every other resource belongs to one."""


@account.command("create")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def account_create(state: cli.CliState, name: str, as_json: bool) -> None:
    async def action(store: sql.SqlStore) -> models.Account:
        created = await store.create_account(name)
        await audited(store, "account.create", f"account:{name}")
        return created

    created = cli.run_with_store(state, action)
    console.emit_json(created) if as_json else click.echo(f"created account {created.name}")


@account.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def account_list(state: cli.CliState, as_json: bool) -> None:
    found = cli.run_with_store(state, lambda store: store.list_accounts())
    if as_json:
        console.emit_json(found)
        return
    console.table(
        [(a.name, a.id, console.format_time(a.created_at)) for a in found],
        ["NAME", "ID", "CREATED"],
    )


# ---- token -----------------------------------------------------------------------------


@click.group()
def token() -> None:
    """Agent tokens (key id + secret; the secret is shown once and stored hashed)."""


@token.command("create")
@click.option("--bucket", "buckets", multiple=True, required=True, help="Bucket in scope (repeat).")
@click.option("--name", default="agent", show_default=True, help="A label for people.")
@admin
@click.pass_obj
def token_create(
    state: cli.CliState, buckets: tuple[str, ...], name: str, account_name: str, as_json: bool
) -> None:
    key_id, secret = auth.new_token()

    async def action(store: sql.SqlStore) -> models.Token:
        acct = await store.get_account(account_name)
        scope = [await store.get_bucket(acct.id, b) for b in dict.fromkeys(buckets)]
        created = await store.create_token(
            key_id=key_id,
            account_id=acct.id,
            name=name,
            secret_hash=auth.hash_secret(secret),
            bucket_ids=[b.id for b in scope],
        )
        await audited(store, "token.create", f"token:{key_id}", f"buckets={','.join(buckets)}")
        return created

    cli.run_with_store(state, action)
    full = f"{key_id}.{secret}"
    if as_json:
        console.emit_json({"key_id": key_id, "token": full, "buckets": list(buckets), "name": name})
        return
    click.echo(f"created token {key_id} for bucket(s) {', '.join(buckets)}")
    click.echo(f"token: {full}")
    click.echo(
        "This is the only time the secret is shown. Give it to the agent as "
        "--token-file or STOWHOOK_TOKEN.",
        err=True,
    )


@token.command("list")
@admin
@click.pass_obj
def token_list(state: cli.CliState, account_name: str, as_json: bool) -> None:
    async def action(store: sql.SqlStore) -> list[tuple[models.Token, list[str]]]:
        return await store.list_tokens((await store.get_account(account_name)).id)

    found = cli.run_with_store(state, action)
    if as_json:
        console.emit_json([{**console.to_jsonable(t), "bucket_names": names} for t, names in found])
        return
    console.table(
        [
            (
                t.key_id,
                t.name,
                ",".join(names),
                "revoked" if t.revoked_at else "active",
                console.format_time(t.created_at),
                console.format_time(t.last_used_at),
                _previous_secret(t),
            )
            for t, names in found
        ],
        ["KEY ID", "NAME", "BUCKETS", "STATUS", "CREATED", "LAST USED", "OLD SECRET VALID UNTIL"],
    )


def _previous_secret(found: models.Token) -> str:
    until = found.previous_valid_until
    if until is None or found.revoked_at is not None or models.to_ms(until) <= models.now_ms():
        return "-"
    return console.format_time(until)


@token.command("rotate")
@click.argument("key_id")
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="How long the current secret keeps working beside the new one (0: ends now).",
)
@admin
@click.pass_obj
def token_rotate(
    state: cli.CliState, key_id: str, grace: str, account_name: str, as_json: bool
) -> None:
    """Give a token a new secret (same key id); the old one works until the grace ends.

    Agents keep running on the old secret meanwhile: update each to the new one, then
    watch `token_previous_secret_used` disappear from the server log.
    """
    grace_ms = console.parse_duration_ms(grace)
    secret = auth.new_token()[1]

    async def action(store: sql.SqlStore) -> models.Token:
        acct = await store.get_account(account_name)
        rotated = await store.rotate_token(acct.id, key_id, auth.hash_secret(secret), grace_ms)
        await audited(store, "token.rotate", f"token:{key_id}", f"grace={grace}")
        return rotated

    rotated = cli.run_with_store(state, action)
    full = f"{key_id}.{secret}"
    until = rotated.previous_valid_until
    if as_json:
        console.emit_json(
            {"key_id": key_id, "token": full, "previous_valid_until": console.to_jsonable(until)}
        )
        return
    click.echo(f"rotated token {key_id}")
    click.echo(f"token: {full}")
    old = f"until {console.format_time(until)} UTC" if until else "no longer (--grace 0)"
    click.echo(
        f"The old secret works {old}. This is the only time the new secret is shown.",
        err=True,
    )


@token.command("revoke")
@click.argument("key_id")
@admin
@click.pass_obj
def token_revoke(state: cli.CliState, key_id: str, account_name: str, as_json: bool) -> None:
    async def action(store: sql.SqlStore) -> None:
        await store.revoke_token((await store.get_account(account_name)).id, key_id)
        await audited(store, "token.revoke", f"token:{key_id}")

    cli.run_with_store(state, action)
    console.emit_json({"revoked": key_id}) if as_json else click.echo(f"revoked token {key_id}")


# ---- input -----------------------------------------------------------------------------


@click.group("input")
def input_() -> None:
    """Public webhook endpoints: {public_url}/in/{input_id}."""


@input_.command("create")
@click.option("--bucket", "bucket_name", required=True)
@click.option("--name", default="input", show_default=True)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(1),
    default=None,
    help="Lower this input's body limit below the server's.",
)
@admin
@click.pass_obj
def input_create(
    state: cli.CliState,
    bucket_name: str,
    name: str,
    max_body_bytes: int | None,
    account_name: str,
    as_json: bool,
) -> None:
    async def action(store: sql.SqlStore) -> models.Input:
        found = await store.get_bucket((await store.get_account(account_name)).id, bucket_name)
        created = await store.create_input(found, name, max_body_bytes)
        await audited(store, "input.create", f"input:{created.id}", f"bucket={bucket_name}")
        return created

    created = cli.run_with_store(state, action)
    url = f"{state.public_base()}/in/{created.id}"
    if as_json:
        console.emit_json({**console.to_jsonable(created), "url": url})
        return
    click.echo(f"created input {created.name} in bucket {bucket_name}")
    click.echo(f"url: {url}")


@input_.command("list")
@click.option("--bucket", "bucket_name", default=None)
@admin
@click.pass_obj
def input_list(
    state: cli.CliState, bucket_name: str | None, account_name: str, as_json: bool
) -> None:
    async def action(store: sql.SqlStore) -> list[tuple[models.Input, str]]:
        acct = await store.get_account(account_name)
        bucket_id = (await store.get_bucket(acct.id, bucket_name)).id if bucket_name else None
        return await store.list_inputs(acct.id, bucket_id)

    found = cli.run_with_store(state, action)
    base = state.public_base()
    if as_json:
        console.emit_json(
            [{**console.to_jsonable(i), "bucket": b, "url": f"{base}/in/{i.id}"} for i, b in found]
        )
        return
    console.table(
        [
            (
                i.id,
                i.name,
                b,
                answers.describe(i.response),
                i.rate_limit.describe() if i.rate_limit else "-",
                signatures.describe(i.verification),
                f"{base}/in/{i.id}",
            )
            for i, b in found
        ],
        ["ID", "NAME", "BUCKET", "RESPONSE", "RATE LIMIT", "SIGNATURES", "URL"],
    )


@input_.command("delete")
@click.argument("input_id")
@admin
@click.pass_obj
def input_delete(state: cli.CliState, input_id: str, account_name: str, as_json: bool) -> None:
    async def action(store: sql.SqlStore) -> None:
        await store.delete_input((await store.get_account(account_name)).id, input_id)
        await audited(store, "input.delete", f"input:{input_id}")

    cli.run_with_store(state, action)
    console.emit_json({"deleted": input_id}) if as_json else click.echo(f"deleted input {input_id}")
