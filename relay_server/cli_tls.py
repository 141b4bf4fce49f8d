"""`relay-server token bind`: tie an agent token to one mTLS client certificate.

A bound token is refused (PERMISSION_DENIED) on any connection whose client certificate
is not that one, so a leaked token is useless without the agent's private key. Only the
SHA-256 of the certificate (DER) is stored; the certificate is public, so the fingerprint
may appear in the audit entry.
"""

from __future__ import annotations

import pathlib

import click

from relay_server import cli, cli_admin, console, tls
from relay_server.store import sql


@click.command("bind")
@click.argument("key_id")
@click.option(
    "--cert",
    "cert_path",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="The agent's client certificate (PEM) to bind the token to.",
)
@click.option("--unbind", is_flag=True, help="Remove the binding: any client certificate works.")
@cli_admin.admin
@click.pass_obj
def token_bind(
    state: cli.CliState,
    key_id: str,
    cert_path: pathlib.Path | None,
    unbind: bool,
    account_name: str,
    as_json: bool,
) -> None:
    """Accept KEY_ID only from an agent presenting this client certificate (needs mTLS:
    serve --grpc-tls-client-ca)."""
    if (cert_path is None) == (not unbind):
        raise click.UsageError("give exactly one of --cert PATH or --unbind")
    with cli.reported_errors():
        sha256 = None if cert_path is None else tls.fingerprint(cert_path.read_bytes())

    async def action(store: sql.SqlStore) -> None:
        await store.bind_token((await store.get_account(account_name)).id, key_id, sha256)
        if sha256 is None:
            await cli_admin.audited(store, "token.unbind", f"token:{key_id}")
        else:
            await cli_admin.audited(store, "token.bind", f"token:{key_id}", f"sha256={sha256}")

    cli.run_with_store(state, action)
    if as_json:
        console.emit_json({"key_id": key_id, "client_cert_sha256": sha256})
    elif sha256 is None:
        click.echo(f"token {key_id} accepts any client certificate again")
    else:
        click.echo(f"bound token {key_id} to client certificate sha256:{sha256}")
