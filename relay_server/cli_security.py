"""`relay-server bucket auth` and `input verify`: who may post to an input, and proof it
came from the provider.

Secrets are read from files (or typed without echo when the path is `-`), never taken on
the command line where `ps` and shell history would keep them. Passwords and tokens are
stored as bcrypt hashes; signing secrets are sealed with the AES key. The audit entries
say what changed, never the secret. A running server picks a change up within its route
cache time (2 s).
"""

from __future__ import annotations

import pathlib
from typing import Any

import click

from relay_server import auth, cli, cli_admin, console, models
from relay_server.ingress import answers, signatures
from relay_server.store import sql

MIN_CREDENTIAL_CHARS = 12  # shorter passwords and tokens are guessable
MAX_TOLERANCE_MS = 3_600_000


def register(root: click.Group) -> None:
    """Add `bucket auth` and `input verify` to their groups."""
    for group_name, command in (("bucket", bucket_auth), ("input", input_verify)):
        group = root.commands[group_name]
        assert isinstance(group, click.Group)
        group.add_command(command)


def read_secret(path: str, what: str, *, confirm: bool) -> str:
    """The secret in file `path` (surrounding whitespace dropped), or typed if path is `-`."""
    if path == "-":
        text: str = click.prompt(what, hide_input=True, confirmation_prompt=confirm)
    else:
        try:
            text = pathlib.Path(path).read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from exc
    secret = text.strip()
    if not secret:
        raise click.BadParameter(f"the {what} is empty")
    return secret


def check_credential(secret: str, what: str) -> None:
    if len(secret) < MIN_CREDENTIAL_CHARS:
        raise click.BadParameter(f"the {what} must be at least {MIN_CREDENTIAL_CHARS} characters")
    if len(secret.encode()) > auth.BCRYPT_MAX_BYTES:
        raise click.BadParameter(f"the {what} must be at most {auth.BCRYPT_MAX_BYTES} bytes")


# ---- bucket auth -----------------------------------------------------------------------


@click.command("auth")
@click.argument("name")
@click.option("--basic", "username", metavar="USERNAME", help="HTTP basic auth as USERNAME.")
@click.option(
    "--password-file",
    metavar="PATH",
    help="File holding the basic auth password ('-': type it).",
)
@click.option(
    "--token-file",
    metavar="PATH",
    help="File holding a token senders present as 'Authorization: Bearer <token>' or "
    "?token=<token> ('-': type it).",
)
@click.option("--none", "off", is_flag=True, help="Anyone with an input's URL may post.")
@cli_admin.admin
@click.pass_obj
def bucket_auth(
    state: cli.CliState,
    name: str,
    username: str | None,
    password_file: str | None,
    token_file: str | None,
    off: bool,
    account_name: str,
    as_json: bool,
) -> None:
    """Require credentials on every input of bucket NAME (or --none).

    A webhook without them is answered 401 and nothing is stored. The credential is
    stored as a bcrypt hash and removed from the events before they are stored.
    """
    chosen = input_auth(username, password_file, token_file, off)

    async def action(store: sql.SqlStore) -> None:
        found = await cli_admin.owned_bucket(store, account_name, name)
        await store.set_input_auth(found, chosen)
        await cli_admin.audited(
            store, "bucket.auth", f"bucket:{name}", models.describe_auth(chosen)
        )

    cli.run_with_store(state, action)
    if as_json:
        console.emit_json({"bucket": name, "input_auth": chosen})
    else:
        click.echo(f"bucket {name} input auth: {models.describe_auth(chosen)}")


def input_auth(
    username: str | None, password_file: str | None, token_file: str | None, off: bool
) -> models.InputAuth | None:
    """The auth the flags ask for, its secret hashed; click errors naming the problem."""
    if [username is not None, token_file is not None, off].count(True) != 1:
        raise click.UsageError("give exactly one of --basic USERNAME, --token-file or --none")
    if password_file is not None and username is None:
        raise click.UsageError("--password-file goes with --basic USERNAME")
    if off:
        return None
    if token_file is not None:
        token = read_secret(token_file, "token", confirm=True)
        check_credential(token, "token")
        hashed = auth.hash_secret(token)
        return models.InputAuth(kind=models.InputAuthKind.TOKEN, secret_hash=hashed)
    if not username or ":" in username:
        raise click.BadParameter("a basic auth user name is non-empty and has no ':'")
    if password_file is None:
        raise click.UsageError("--basic USERNAME needs --password-file PATH ('-': type it)")
    password = read_secret(password_file, "password", confirm=True)
    check_credential(password, "password")
    return models.InputAuth(
        kind=models.InputAuthKind.BASIC, username=username, secret_hash=auth.hash_secret(password)
    )


# ---- input verify ----------------------------------------------------------------------


@click.command("verify")
@click.argument("input_id")
@click.option(
    "--provider",
    type=click.Choice([kind.value for kind in models.VerifyKind]),
    help="Whose signature scheme to check.",
)
@click.option(
    "--secret-file",
    "secret_files",
    multiple=True,
    metavar="PATH",
    help="File holding a signing secret ('-': type it); repeat while rotating: any matches.",
)
@click.option("--header", default=None, help="hmac: the header carrying the signature.")
@click.option(
    "--encoding", type=click.Choice(["hex", "base64"]), default=None, help="hmac [default: hex]."
)
@click.option("--prefix", default=None, help="hmac: text before the signature, e.g. 'sha256='.")
@click.option(
    "--tolerance",
    metavar="DURATION",
    default=None,
    help="stripe, slack, standard-webhooks: how far a signature's timestamp may be from "
    "now [default: 5m].",
)
@click.option("--off", is_flag=True, help="Stop checking signatures on this input.")
@cli_admin.admin
@click.pass_obj
def input_verify(
    state: cli.CliState,
    /,
    input_id: str,
    off: bool,
    account_name: str,
    as_json: bool,
    **flags: Any,
) -> None:
    """Check the provider's signature on every webhook to INPUT_ID (or --off).

    Signed webhooks with a wrong, missing or out-of-tolerance signature get 401 and are
    not stored; a timestamped one seen before gets 401 as a replay.
    """
    if off:
        if any(flags.values()):
            raise click.UsageError("--off takes no other option")
        chosen = None
    else:
        chosen = verification(**flags)

    described = signatures.describe(chosen)

    async def action(store: sql.SqlStore) -> None:
        await cli_admin.owned_input(store, account_name, input_id)
        await store.set_verification(input_id, chosen)
        await cli_admin.audited(store, "input.verify", f"input:{input_id}", described)

    cli.run_with_store(state, action, need_key=True)
    if as_json:
        console.emit_json({"input_id": input_id, "verification": chosen})
    else:
        click.echo(f"input {input_id} signatures: {described}")


def verification(
    *,
    provider: str | None,
    secret_files: tuple[str, ...],
    header: str | None,
    encoding: str | None,
    prefix: str | None,
    tolerance: str | None,
) -> models.Verification:
    """The verification the flags ask for, with its secrets read and checked."""
    if provider is None or not secret_files:
        raise click.UsageError("give --provider and at least one --secret-file, or --off")
    kind = models.VerifyKind(provider)
    generic = kind is models.VerifyKind.HMAC
    if generic and not (header and answers.HEADER_NAME.match(header)):
        raise click.UsageError("--provider hmac needs --header NAME (an HTTP header name)")
    if not generic and (header or encoding or prefix):
        raise click.UsageError("--header, --encoding and --prefix are for --provider hmac")
    if tolerance is not None and kind not in signatures.TIMESTAMPED:
        raise click.UsageError(f"{provider} signatures carry no timestamp: drop --tolerance")
    tolerance_ms = console.parse_duration_ms(tolerance or "5m")
    if not 1000 <= tolerance_ms <= MAX_TOLERANCE_MS:
        raise click.BadParameter("--tolerance must be between 1s and 1h")
    secrets = tuple(read_secret(path, "signing secret", confirm=False) for path in secret_files)
    for secret in secrets:
        try:
            signatures.check_secret(kind, secret)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--secret-file") from exc
    return models.Verification(
        kind=kind,
        secrets=secrets,
        header=header or "",
        encoding=encoding or "hex",
        prefix=prefix or "",
        tolerance_s=tolerance_ms // 1000,
    )
