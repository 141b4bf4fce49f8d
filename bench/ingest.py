"""Ingest figures: how fast webhooks are committed, against `bare` on the same machine.

  durable ingest rate   1 KiB POSTs at 64 connections, every one sealed and committed
                        (SQLite synchronous=FULL, PostgreSQL synchronous_commit as the
                        server has it) before its 200; goal >= 60 % of bare
  large bodies          10 MiB POSTs at 4 connections, MiB/s; goal >= 50 % of bare, and
                        the server's peak RSS during the run <= 300 MiB

`bare` is bench.apps' minimal aiohttp app on the same loop (uvloop when installed): it
reads the body and answers 200, storing nothing. The same load generator, in its own
process, drives both.
"""

from __future__ import annotations

from typing import Any

from bench import figures, load, plan, procs

LARGE_BODY = 10 * 2**20
RSS_LIMIT_MIB = 300


async def bare_rate(run: plan.Run, name: str, **workload: Any) -> dict[str, Any]:
    """The throughput workload against a fresh `bare` app."""
    async with procs.Group(run.scratch(name)) as group:
        port = procs.free_port()
        bare = await group.python("bare", "bench.apps", "bare", str(port))
        await procs.wait_http(f"http://127.0.0.1:{port}/", bare)
        return await load.flood(group, "load", [f"http://127.0.0.1:{port}/in/bare"], **workload)


def _note_errors(run: plan.Run, what: str, result: dict[str, Any]) -> None:
    if result["errors"]:
        run.notes.append(f"{what}: requests not answered 2xx: {result['errors']}")


async def durable_ingest(run: plan.Run) -> list[figures.Figure]:
    workload: dict[str, Any] = {"connections": 64, "seconds": run.sizes.ingest_s}
    bare = await bare_rate(run, "ingest-bare", **workload)
    relay = await run.installation("ingest")
    async with procs.Group(relay.folder) as group:
        await relay.serve(group)
        result = await load.flood(group, "load", [relay.input_url()], **workload)
    _note_errors(run, "durable ingest", result)
    _note_errors(run, "bare ingest", bare)
    run.measured["ingest_rate"] = result["rate"]
    return [
        figures.ratio_figure(
            "durable ingest rate",
            result["rate"],
            "req/s",
            "bare",
            bare["rate"],
            at_least=0.6,
        )
    ]


async def large_bodies(run: plan.Run) -> list[figures.Figure]:
    workload: dict[str, Any] = {
        "connections": 4,
        "seconds": run.sizes.large_s,
        "body_bytes": LARGE_BODY,
    }
    bare = await bare_rate(run, "large-bare", **workload)
    relay = await run.installation("large")
    async with procs.Group(relay.folder) as group:
        server = await relay.serve(group)
        async with procs.PeakRss(server.pid).watching() as rss:
            result = await load.flood(group, "load", [relay.input_url()], **workload)
    _note_errors(run, "large bodies", result)
    return [
        figures.ratio_figure(
            "large-body ingest (10 MiB, 4 conns)",
            result["mib_per_s"],
            "MiB/s",
            "bare",
            bare["mib_per_s"],
            at_least=0.5,
        ),
        figures.bound_figure(
            "server peak RSS, 10 MiB bodies", rss.peak, "MiB", at_most=RSS_LIMIT_MIB
        ),
    ]
