"""`relay-server input limit`: an input's own request rate (429 + Retry-After above it).

The limit is a token bucket (see relay_server/ingress/limits.py) applied on top of the
server-wide per-source limit; a running server picks a change up within its route cache
time (2 s). Audited.
"""

from __future__ import annotations

import math

import click

from relay_server import cli, cli_admin, console, models
from relay_server.store import sql


@click.command("limit")
@click.argument("input_id")
@click.option(
    "--rate",
    metavar="N/s",
    default=None,
    help="Requests the input takes on average: 10/s, 600/m or 100/h.",
)
@click.option(
    "--burst",
    type=click.IntRange(1),
    default=None,
    help="Requests it takes at once above the rate [one second's worth, at least 1].",
)
@click.option("--off", is_flag=True, help="Remove the input's own limit.")
@cli_admin.admin
@click.pass_obj
def input_limit(
    state: cli.CliState,
    input_id: str,
    rate: str | None,
    burst: int | None,
    off: bool,
    account_name: str,
    as_json: bool,
) -> None:
    """Limit how fast input INPUT_ID takes webhooks (or --off)."""
    chosen = rate_limit(rate, burst, off)

    async def action(store: sql.SqlStore) -> None:
        await cli_admin.owned_input(store, account_name, input_id)
        await store.set_rate_limit(input_id, chosen)
        await cli_admin.audited(store, "input.limit", f"input:{input_id}", describe(chosen))

    cli.run_with_store(state, action)
    if as_json:
        console.emit_json({"input_id": input_id, "rate_limit": chosen})
    else:
        click.echo(f"input {input_id} rate limit: {describe(chosen)}")


def rate_limit(rate: str | None, burst: int | None, off: bool) -> models.RateLimit | None:
    """The limit the flags ask for; click.UsageError naming the problem."""
    if off:
        if rate is not None or burst is not None:
            raise click.UsageError("--off takes no --rate or --burst")
        return None
    if rate is None:
        raise click.UsageError("give --rate (e.g. --rate 10/s) or --off")
    per_s = console.parse_rate(rate)
    if per_s <= 0:
        raise click.UsageError("--rate must be above 0 (use --off to remove the limit)")
    return models.RateLimit(per_s=per_s, burst=burst or max(1, math.ceil(per_s)))


def describe(limit: models.RateLimit | None) -> str:
    return "none" if limit is None else limit.describe()
