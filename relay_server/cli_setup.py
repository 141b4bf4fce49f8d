"""Set-up commands: `init`, `quickstart`, `keys generate`."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import sys

import click

from relay_server import auth, cli, crypto, errors, models, settings
from relay_server.store import sql

QUICKSTART_BUCKET = "quickstart"
QUICKSTART_TOKEN_FILE = "quickstart-agent.token"


def register(group: click.Group) -> None:
    group.add_command(init)
    group.add_command(quickstart)
    group.add_command(keys)


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

    cli.run_with_store(state, action, need_key=True)
    click.echo(f"key file: {state.key_file} ({'created' if created else 'kept'})")
    click.echo("database: ready; account 'default' exists")


@click.group()
def keys() -> None:
    """AES-256 keys that seal payloads at rest."""


@keys.command("generate")
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
    agent = shlex.join(
        [
            _agent_program(),
            "run",
            "--server",
            grpc_address,
            "--insecure",
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
    click.echo("  (--insecure: plaintext gRPC for this local demo; use TLS in production)\n")
