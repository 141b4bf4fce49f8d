"""`python -m relay_agent` is the `relay-agent` command."""

from __future__ import annotations

from relay_agent import cli

if __name__ == "__main__":
    cli.main()
