"""`python -m bench.core`: the ingest and drain figures only, as `python -m bench --only
ingest,drain` (kept for the instructions that name it; see bench/run.py). Other
arguments (--quick, --engine, --keep) are passed on."""

from __future__ import annotations

import sys

from bench import run

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--only", "ingest,drain", *sys.argv[1:]]
    run.main()
