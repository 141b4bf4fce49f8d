"""`relay-server input respond`: what an input answers the webhook's sender.

The modes are described in relay_server/ingress/answers.py; they are checked there too,
so the CLI refuses what the server could not send. Audited (header names and sizes only,
never values or bodies).
"""

from __future__ import annotations

from typing import IO

import click

from relay_server import cli, cli_admin, console, models
from relay_server.ingress import answers
from relay_server.store import sql

DEFAULT_TIMEOUT = "30s"


@click.command("respond")
@click.argument("input_id")
@click.option(
    "--mode",
    type=click.Choice([kind.value for kind in models.ResponseKind]),
    required=True,
    help="accept: 200, empty. static: the --status/--header/--body-file answer. "
    "wait: the destination's own answer, relayed by the agent, within --timeout.",
)
@click.option("--status", type=int, default=None, help="static/--fallback: the status [200].")
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar='"NAME: VALUE"',
    help="static/--fallback: a header to send (repeat).",
)
@click.option(
    "--body-file",
    type=click.File("rb"),
    default=None,
    help=f"static/--fallback: the body, read from this file ('-': stdin); at most "
    f"{answers.MAX_STATIC_BODY_BYTES // 1024} KiB.",
)
@click.option(
    "--timeout",
    metavar="DURATION",
    default=None,
    help=f"wait: how long to hold the sender [{DEFAULT_TIMEOUT}]; then 504, or the "
    "--fallback answer. The event is stored and delivered either way.",
)
@click.option(
    "--fallback",
    is_flag=True,
    help="wait: on timeout answer --status/--header/--body-file instead of 504.",
)
@cli_admin.admin
@click.pass_obj
def input_respond(
    state: cli.CliState,
    input_id: str,
    mode: str,
    status: int | None,
    headers: tuple[str, ...],
    body_file: IO[bytes] | None,
    timeout: str | None,
    fallback: bool,
    account_name: str,
    as_json: bool,
) -> None:
    """Set what input INPUT_ID answers once a webhook is stored."""
    chosen = response_mode(
        models.ResponseKind(mode),
        status=status,
        headers=headers,
        body=None if body_file is None else body_file.read(answers.MAX_STATIC_BODY_BYTES + 1),
        timeout=timeout,
        fallback=fallback,
    )

    async def action(store: sql.SqlStore) -> None:
        await cli_admin.owned_input(store, account_name, input_id)
        await store.set_response(input_id, chosen)
        await cli_admin.audited(store, "input.respond", f"input:{input_id}", audit_detail(chosen))

    cli.run_with_store(state, action)
    if as_json:
        console.emit_json({"input_id": input_id, "response": chosen})
    else:
        click.echo(f"input {input_id} answers: {answers.describe(chosen)}")


def response_mode(
    kind: models.ResponseKind,
    *,
    status: int | None,
    headers: tuple[str, ...],
    body: bytes | None,
    timeout: str | None,
    fallback: bool,
) -> models.ResponseMode:
    """The mode the flags ask for; click.UsageError naming the first problem."""
    answer_flags = status is not None or bool(headers) or body is not None
    if kind is not models.ResponseKind.WAIT and (timeout is not None or fallback):
        raise click.UsageError("--timeout and --fallback only apply to --mode wait")
    if kind is models.ResponseKind.ACCEPT and answer_flags:
        raise click.UsageError("--mode accept answers 200 with no body: drop the other flags")
    if kind is models.ResponseKind.WAIT and answer_flags and not fallback:
        raise click.UsageError("--status/--header/--body-file need --fallback in --mode wait")
    mode = models.ResponseMode(
        kind=kind,
        status=200 if status is None else status,
        headers=tuple(parse_header(text) for text in headers),
        body=body or b"",
        timeout_ms=console.parse_duration_ms(timeout or DEFAULT_TIMEOUT),
        fallback=fallback,
    )
    try:
        answers.check_mode(mode)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    return mode


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise click.UsageError(f'--header takes "Name: value", not {text[:100]!r}')
    return name.strip(), value.strip()


def audit_detail(mode: models.ResponseMode) -> str:
    """The change without header values or the body (they may be private)."""
    names = ",".join(name for name, _ in mode.headers) or "-"
    return (
        f"mode={mode.kind} status={mode.status} headers={names} body_bytes={len(mode.body)} "
        f"timeout_ms={mode.timeout_ms} fallback={mode.fallback}"
    )
