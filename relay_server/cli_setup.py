"""Set-up commands: `init`, `quickstart`, and the `keys` group (generate, rotate, list, remove)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shlex
import shutil
import sys
import time

import click

from relay_server import auth, cli, cli_admin, console, crypto, errors, keys, models, settings
from relay_server.store import rekey, sql

QUICKSTART_BUCKET = "quickstart"
QUICKSTART_TOKEN_FILE = "quickstart-agent.token"


def register(group: click.Group) -> None:
    group.add_command(init)
    group.add_command(quickstart)
    group.add_command(keys_group)


def ensure_key_file(path: pathlib.Path) -> bool:
    """Create the key file if missing; True if it was created."""
    if path.exists():
        crypto.load_key_file(path)  # refuse a bad or world-readable one early
        return False
    crypto.write_new_key_file(path)
    return True


async def ensure_account(store: sql.SqlStore, name: str) -> models.Account:
    try:
        return await store.get_account(name)
    except errors.NotFound:
        return await store.create_account(name)


@click.command()
@click.pass_obj
def init(state: cli.CliState) -> None:
    """Create the key file (if missing), the schema and the `default` account."""
    with cli.reported_errors():
        created = ensure_key_file(state.key_file)

    async def action(store: sql.SqlStore) -> None:
        await ensure_account(store, "default")
        await cli_admin.audited(store, "init", "account:default", f"key file {created=}")

    cli.run_with_store(state, action, need_key=True)
    click.echo(f"key file: {state.key_file} ({'created' if created else 'kept'})")
    click.echo("database: ready; account 'default' exists")


@click.group("keys")
def keys_group() -> None:
    """AES-256 keys that seal payloads at rest: generate, rotate, list, remove."""


@keys_group.command("generate")
@click.option("--key-file", "path", required=True, type=click.Path(path_type=pathlib.Path))
def keys_generate(path: pathlib.Path) -> None:
    """Write a new key file (mode 0600); refuses to overwrite one."""
    try:
        crypto.write_new_key_file(path)
    except FileExistsError as exc:
        raise cli.RelayCliError(f"{path} exists; refusing to overwrite a key") from exc
    click.echo(
        f"wrote a new AES-256 key to {path} (mode 0600); back it up: without it, "
        "stored events cannot be read"
    )


@keys_group.command("rotate")
@click.option(
    "--resume",
    is_flag=True,
    help="Add no key: re-encrypt what is not under the primary yet (finishes an interrupted "
    "rotation, or the second step after --no-reencrypt).",
)
@click.option(
    "--no-reencrypt",
    is_flag=True,
    help="Only add the new primary key. With several servers: copy the key file to each, "
    "then run --resume.",
)
@click.option(
    "--reload-wait",
    default=console.format_duration_ms(int(keys.DEFAULT_RELOAD_WAIT_S * 1000)),
    show_default=True,
    metavar="DURATION",
    help="Time running servers get to re-read the key file (they check every "
    f"{keys.RELOAD_INTERVAL_S:g}s, or at once on SIGHUP) before records are re-encrypted.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=rekey.DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Rows re-encrypted per write transaction.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary for scripts.")
@click.pass_obj
def keys_rotate(
    state: cli.CliState,
    resume: bool,
    no_reencrypt: bool,
    reload_wait: str,
    batch_size: int,
    as_json: bool,
) -> None:
    """Add a new primary key, then re-encrypt every stored record with it.

    Safe while servers run: they re-read the key file before anything is re-encrypted.
    Old keys stay in the file (remove them with `keys remove` once unused). Interrupted?
    Run `keys rotate --resume`.
    """
    if resume and no_reencrypt:
        raise click.UsageError("--resume and --no-reencrypt exclude each other")
    wait_s = console.parse_duration_ms(reload_wait) / 1000
    path = state.key_file
    with cli.reported_errors(), crypto.key_file_lock(path):
        before = crypto.load_key_file(path)
        ring = before if resume else crypto.add_primary_key(path)
        if not resume:
            click.echo(f"added key {ring.primary_id} as the primary to {path}", err=True)
        summary = {"primary": ring.primary_id, "previous_primary": before.primary_id}

        async def action(store: sql.SqlStore) -> rekey.RekeyReport | None:
            if no_reencrypt:
                await cli_admin.audited(store, "keys.rotate", f"key:{ring.primary_id}", "added")
                return None
            if not as_json:
                click.echo(f"waiting {reload_wait} for running servers to load it", err=True)
            await keys.wait_for_reload(path, wait_s)
            return await _reencrypt(store, summary, batch_size, quiet=as_json)

        report = cli.run_with_store(state, action, need_key=True)
    _report_rotation(summary, report, as_json)


async def _reencrypt(
    store: sql.SqlStore, summary: dict[str, str], batch_size: int, *, quiet: bool
) -> rekey.RekeyReport:
    progress = _Progress(quiet=quiet)
    resource = f"key:{summary['primary']}"
    try:
        report = await rekey.reencrypt(store, batch_size=batch_size, progress=progress)
    except (asyncio.CancelledError, errors.RelayError) as exc:
        done = progress.last.done if progress.last else 0
        await asyncio.shield(
            cli_admin.audited(
                store, "keys.rotate", resource, f"stopped after {done}: {exc!r}", result="error"
            )
        )
        click.echo(
            "re-encryption stopped; finish it with: relay-server keys rotate --resume", err=True
        )
        raise
    progress.finish(report)
    previous = summary["previous_primary"]
    detail = f"re-encrypted {report.done}" + (
        "; resumed" if previous == summary["primary"] else f"; previous primary {previous}"
    )
    await cli_admin.audited(
        store,
        "keys.rotate",
        resource,
        detail + (f"; {report.failed} failed" if report.failed else ""),
        result="error" if report.failed else "ok",
    )
    return report


class _Progress:
    """`re-encrypted 1200/3000 records (850/s)` on stderr: redrawn on a terminal, else a
    line at most every second."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.started = self.shown = time.monotonic()
        self.last: rekey.RekeyReport | None = None

    def __call__(self, report: rekey.RekeyReport) -> None:
        self.last = report
        now = time.monotonic()
        if self.quiet or (not self.tty and now - self.shown < 1.0):
            return
        self.shown = now
        click.echo(("\r" if self.tty else "") + self.line(report), err=True, nl=not self.tty)

    def line(self, report: rekey.RekeyReport) -> str:
        rate = report.done / max(time.monotonic() - self.started, 1e-3)
        return f"re-encrypted {report.done}/{report.total} records ({rate:,.0f}/s)"

    def finish(self, report: rekey.RekeyReport) -> None:
        if not self.quiet:
            click.echo(("\r" if self.tty else "") + self.line(report), err=True)


def _report_rotation(
    summary: dict[str, str], report: rekey.RekeyReport | None, as_json: bool
) -> None:
    counts = (
        {}
        if report is None
        else {"total": report.total, "reencrypted": report.done, "failed": report.failed}
    )
    failures = [] if report is None else report.failures
    if as_json:
        console.emit_json({**summary, **counts, "failures": [list(f) for f in failures]})
    elif report is None:
        click.echo(f"primary key: {summary['primary']}; nothing re-encrypted (--no-reencrypt)")
    else:
        click.echo(
            f"primary key: {summary['primary']}; {report.done} record(s) re-encrypted, "
            f"{report.failed} failed"
        )
        for where, why in failures:
            click.echo(f"  cannot open {where}: {why}", err=True)
    if failures:
        raise cli.RelayCliError(
            f"{report.failed if report else 0} record(s) could not be opened and keep their "
            "old key; see above"
        )


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def keys_list(state: cli.CliState, as_json: bool) -> None:
    """The keys of the key file (and any key id stored records name), with record counts."""
    with cli.reported_errors():
        ring = crypto.load_key_file(state.key_file)
    found = cli.run_with_store(state, lambda store: keys.usage(store, ring), need_key=True)
    if as_json:
        console.emit_json([{**console.to_jsonable(u), "total": u.total} for u in found])
        return
    console.table(
        [
            (
                u.key_id,
                "primary" if u.primary else ("old" if u.in_file else "MISSING from key file"),
                u.total,
                ", ".join(f"{name} {n}" for name, n in _by_table(u.records).items()) or "-",
            )
            for u in found
        ],
        ["KEY ID", "STATUS", "RECORDS", "WHERE"],
    )


def _by_table(records: dict[str, int]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for column, n in records.items():
        table = column.partition(".")[0]
        totals[table] = totals.get(table, 0) + n
    return totals


@keys_group.command("remove")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_obj
def keys_remove(state: cli.CliState, key_id: str, as_json: bool) -> None:
    """Remove an old key from the key file; refused while any stored record needs it."""

    async def action(store: sql.SqlStore) -> crypto.KeyRing:
        smaller = await keys.remove(store, state.key_file, key_id)
        await cli_admin.audited(store, "keys.remove", f"key:{key_id}")
        return smaller

    ring = cli.run_with_store(state, action, need_key=True)
    if as_json:
        console.emit_json({"removed": key_id, "keys": list(ring.keys), "primary": ring.primary_id})
    else:
        click.echo(f"removed key {key_id}; the key file holds {', '.join(ring.keys)}")


@click.command()
@click.option(
    "--forward",
    default="http://127.0.0.1:8000/",
    show_default=True,
    help="Internal URL the printed agent command forwards to.",
)
@click.option("--grpc-address", default="", help="HOST:PORT agents dial (default: from serve).")
@click.pass_obj
def quickstart(state: cli.CliState, forward: str, grpc_address: str) -> None:
    """Prepare ./var for a first run and print the input URL and agent command.

    Idempotent: a second run reuses the key, bucket, input and agent token.
    """
    with cli.reported_errors():
        key_created = ensure_key_file(state.key_file)
    token_file = state.key_file.parent / QUICKSTART_TOKEN_FILE

    async def action(store: sql.SqlStore) -> tuple[models.Input, str | None]:
        account = await ensure_account(store, "default")
        bucket = await _ensure_bucket(store, account)
        inputs = await store.list_inputs(account.id, bucket.id)
        found = inputs[0][0] if inputs else await store.create_input(bucket, "quickstart")
        secret = await _ensure_token(store, account, bucket, token_file)
        made = f"token {secret.partition('.')[0]} created" if secret else "token reused"
        await cli_admin.audited(store, "quickstart", f"bucket:{QUICKSTART_BUCKET}", made)
        return found, secret

    found, new_token = cli.run_with_store(state, action, need_key=True)
    grpc_address = grpc_address or state.serve_defaults.get(
        "grpc_listen", os.environ.get("STOWHOOK_GRPC_LISTEN", settings.DEFAULT_GRPC_LISTEN)
    )
    _print_quickstart(state, found, token_file, new_token, forward, grpc_address, key_created)


async def _ensure_bucket(store: sql.SqlStore, account: models.Account) -> models.Bucket:
    try:
        return await store.get_bucket(account.id, QUICKSTART_BUCKET)
    except errors.NotFound:
        return await store.create_bucket(account.id, QUICKSTART_BUCKET, models.BucketPolicy())


async def _ensure_token(
    store: sql.SqlStore, account: models.Account, bucket: models.Bucket, token_file: pathlib.Path
) -> str | None:
    """Reuse the token in `token_file` if it still works; else make one. Returns a new token."""
    if token_file.exists():
        key_id, _, _ = token_file.read_text().strip().partition(".")
        found = await store.token(key_id)
        if found is not None and found[0].revoked_at is None:
            return None
    key_id, secret = auth.new_token()
    await store.create_token(
        key_id=key_id,
        account_id=account.id,
        name="quickstart",
        secret_hash=auth.hash_secret(secret),
        bucket_ids=[bucket.id],
    )
    token_file.unlink(missing_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{key_id}.{secret}\n")
    return f"{key_id}.{secret}"


def _agent_program() -> str:
    """`relay-agent` if the shell finds it, else its full path beside this program."""
    if shutil.which("relay-agent"):
        return "relay-agent"
    beside = pathlib.Path(sys.argv[0]).resolve().parent / "relay-agent"
    return str(beside) if beside.exists() else "relay-agent"


def _print_quickstart(
    state: cli.CliState,
    found: models.Input,
    token_file: pathlib.Path,
    new_token: str | None,
    forward: str,
    grpc_address: str,
    key_created: bool,
) -> None:
    url = f"{state.public_base()}/in/{found.id}"
    tls = bool(
        state.serve_defaults.get("grpc_tls_cert") or os.environ.get("STOWHOOK_GRPC_TLS_CERT")
    )
    agent = shlex.join(
        [
            _agent_program(),
            "run",
            "--server",
            grpc_address,
            *([] if tls else ["--insecure"]),
            "--token-file",
            str(token_file.resolve()),
            "--bucket",
            QUICKSTART_BUCKET,
            "--forward",
            forward,
        ]
    )
    click.echo(click.style("Stowhook is ready.", bold=True))
    click.echo(
        f"  key file      {state.key_file} ({'created' if key_created else 'kept'}, mode 0600)"
    )
    click.echo(f"  database      {state.database_url}")
    click.echo(f"  webhook URL   {url}")
    if new_token:
        click.echo(f"  agent token   {new_token}   (shown once; saved to {token_file}, mode 0600)")
    else:
        click.echo(f"  agent token   reused from {token_file}")
    click.echo("\nPoint a provider (or curl) at the webhook URL:")
    click.echo(f"  curl -X POST -H 'Content-Type: application/json' -d '{{\"hello\": 1}}' {url}")
    click.echo("\nIn another terminal, behind your firewall, run the agent:")
    click.echo(f"  {agent}")
    if tls:
        click.echo("  (TLS: add --ca-file PEM unless the server's certificate is public)\n")
    else:
        click.echo("  (--insecure: plaintext gRPC for this local demo; use TLS in production)\n")
