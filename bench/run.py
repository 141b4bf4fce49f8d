"""The bench suite: every figure of Stowhook against baselines measured in the same run.

    python -m bench [--quick] [--engine sqlite|postgres] [--only NAME,...] [--keep]

It starts real relay-server and relay-agent processes on loopback, drives them with the
load generator (bench.load) in processes of its own, and stops everything it started.
For each figure it prints one JSON line

    {"name", "value", "unit", "baseline_name", "baseline_value", "ratio", "goal", "ok"}

then a readable table, and writes the run to bench/results/latest.json (and .md). A
figure that misses its goal is printed as MISSED; the exit status is 0 unless a scenario
could not run at all. --quick scales the workloads down (CI-sized, under 3 minutes in
all); the full sizes take about 10 minutes on 2 CPUs, plus bench.retention's own run.
Figures measured on a busy machine are noisy: compare the ratios, which set each figure
against a baseline measured a minute apart on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench import capacity, delivery, figures, ingest, plan, relay

Measure = Callable[[plan.Run], Awaitable[list[figures.Figure]]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    measure: Measure


# In this order: the latency workload runs at 20 % of the ingest rate measured first.
SCENARIOS = (
    Scenario("ingest", ingest.durable_ingest),
    Scenario("latency", delivery.latency),
    Scenario("drain", delivery.drain_and_fan_out),
    Scenario("backlog", capacity.claim_and_memory),
    Scenario("large", ingest.large_bodies),
    Scenario("agents", capacity.many_agents),
    Scenario("standard", delivery.standard_workloads),
)
RETENTION_MODULE = "bench.retention"  # another part of the suite; run if present


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def measure(run: plan.Run, scenario: Scenario) -> tuple[list[figures.Figure], bool]:
    """The scenario's figures, and whether it ran; a scenario that raises gives one failed
    figure (the others still run)."""
    started = time.monotonic()
    say(f"{scenario.name} ...")
    try:
        found = await scenario.measure(run)
    except Exception as exc:
        say(f"{scenario.name} FAILED after {time.monotonic() - started:.1f}s: {exc!r}")
        return [figures.failed_figure(scenario.name, "", repr(exc))], False
    say(f"{scenario.name} done in {time.monotonic() - started:.1f}s")
    return found, True


async def retention(run: plan.Run) -> tuple[list[figures.Figure], bool]:
    if importlib.util.find_spec(RETENTION_MODULE) is None:
        note = f"{RETENTION_MODULE} is not there: retention figures skipped"
        say(note)
        run.notes.append(note)
        return [], True
    module = importlib.import_module(RETENTION_MODULE)

    async def measure_retention(run: plan.Run) -> list[figures.Figure]:
        found: list[figures.Figure] = await module.run(engine=run.engine, quick=run.quick)
        return found

    return await measure(run, Scenario("retention", measure_retention))


async def durability(engine: str) -> str:
    """What a 200 means on this engine, as the figures were taken."""
    if engine == "sqlite":
        return "SQLite WAL, synchronous=FULL (serve default)"
    import asyncpg

    from tests import pg

    conn = await asyncpg.connect(pg.ADMIN_URL)
    try:
        value = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    return f"PostgreSQL synchronous_commit={value}"


async def run_all(options: argparse.Namespace, folder: pathlib.Path) -> int:
    started = time.monotonic()
    databases = relay.Databases()
    try:
        template_folder = folder / "template"
        template_folder.mkdir()
        template = await relay.make_template(template_folder, options.engine, databases)
        run = plan.Run(
            engine=options.engine,
            quick=options.quick,
            sizes=plan.QUICK if options.quick else plan.FULL,
            folder=folder,
            template=template,
            databases=databases,
        )
        results, failed = [], 0
        chosen = [s for s in SCENARIOS if not options.only or s.name in options.only]
        for scenario in chosen:
            found, ok = await measure(run, scenario)
            failed += not ok
            for fig in found:
                print(fig.as_json(), flush=True)
            results += found
        if not options.only or "retention" in options.only:
            found, ok = await retention(run)
            failed += not ok
            for fig in found:
                print(fig.as_json(), flush=True)
            results += found
        extra = {
            "engine": options.engine,
            "quick": options.quick,
            "durability": await durability(options.engine),
            "serve_flags": list(relay.SERVE_FLAGS),
            "wall_s": round(time.monotonic() - started, 1),
            "notes": run.notes,
        }
        report(results, extra, None if options.only else options.results)
        return 1 if failed else 0
    finally:
        await databases.drop_all()


def report(
    results: list[figures.Figure], extra: dict[str, object], path: pathlib.Path | None
) -> None:
    """The table, the notes and the machine; saved to `path` (and .md) unless None."""
    print()
    print(figures.table(results))
    for note in extra["notes"]:  # type: ignore[attr-defined]
        print(f"note: {note}")
    machine = figures.machine()
    print(
        f"\n{extra['engine']}, {extra['durability']}; {'quick' if extra['quick'] else 'full'} "
        f"run, {extra['wall_s']} s; {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{machine['platform']}"
    )
    if path is None:
        print("not saved: a partial run (--only)")
        return
    figures.save(results, extra, path)
    path.with_suffix(".md").write_text(figures.markdown(results) + "\n")
    print(f"saved {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[1],
    )
    p.add_argument("--quick", action="store_true", help="CI-sized workloads (< 3 min)")
    p.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    names = [s.name for s in SCENARIOS] + ["retention"]
    p.add_argument(
        "--only",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        default=[],
        help=f"comma-separated scenarios: {', '.join(names)}",
    )
    p.add_argument("--keep", action="store_true", help="keep the run's folder (logs, databases)")
    p.add_argument(
        "--results",
        type=pathlib.Path,
        default=figures.RESULTS / "latest.json",
        help="where the run is saved (a .md table goes next to it)",
    )
    return p


def main() -> None:
    p = parser()
    options = p.parse_args()
    unknown = set(options.only) - {s.name for s in SCENARIOS} - {"retention"}
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if options.engine == "postgres":
        from tests import pg

        if not pg.pg_available():
            p.error(pg.SKIP_REASON)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="stowhook-bench-"))
    try:
        code = asyncio.run(run_all(options, folder))
    finally:
        if options.keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(code)
