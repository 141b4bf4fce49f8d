"""`python -m bench`: the whole bench suite (see bench/run.py)."""

from __future__ import annotations

from bench import run

run.main()
