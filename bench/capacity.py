"""Capacity figures: big backlogs and many agents, and what they cost the server.

claim cost vs backlog   the time to lease a batch of 64 (SqlStore.lease, in this
                        process, on the installation's database) at each backlog size;
                        goal: the largest <= 2 x the smallest
memory vs backlog       server RSS idle, and with the largest backlog pending, each after
                        the same warm-up (200 webhooks in, 200 leased and ACKed by an
                        SDK worker); goal <= 300 MiB, the backlog adds <= 20 MiB
many agents             1,000 SDK streams (200 with --quick) in one process (bench.fleet)
                        over 10 buckets: server RSS while they idle (<= 300 MiB); then
                        webhooks spread over the buckets through the ingress: all
                        delivered, and per bucket the fewest deliveries one stream got
                        >= 90 % of the most (fairness)"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from bench import backlog, figures, load, plan, procs, relay

RSS_LIMIT_MIB = 300
BACKLOG_RSS_MIB = 20
WARM_EVENTS = 200
SETTLE_S = 1.0  # after the warm-up or the connections, before reading RSS
FLEET_TIMEOUT_S = 900.0
PROGRESS_EVERY = 200_000
FAIR_SAMPLE = 20  # events per stream below which fairness says little


async def fleet(
    group: procs.Group,
    installation: relay.Installation,
    buckets: Sequence[str],
    *,
    per_bucket: int,
    max_in_flight: int,
    name: str,
) -> procs.Child:
    args = [f"--server={installation.grpc_address}", f"--per-bucket={per_bucket}"]
    args += [f"--max-in-flight={max_in_flight}", f"--timeout={FLEET_TIMEOUT_S}"]
    args += [f"--bucket={bucket}" for bucket in buckets]
    return await group.python(name, "bench.fleet", *args, env=installation.agent_env, stdin=True)


async def warm_rss(installation: relay.Installation, name: str) -> float:
    """Server RSS after the warm-up; the server is stopped afterwards."""
    async with procs.Group(installation.folder) as group:
        server = await installation.serve(group, name=f"server-{name}")
        url = installation.input_url()
        await load.flood(
            group, f"warm-{name}", [url], connections=8, seconds=60, requests=WARM_EVENTS
        )
        worker = await fleet(
            group,
            installation,
            [relay.BUCKET],
            per_bucket=1,
            max_in_flight=64,
            name=f"worker-{name}",
        )
        await worker.message(60)
        await worker.send(f"expect {WARM_EVENTS}")
        await worker.message(120)
        await worker.wait(60)
        await asyncio.sleep(SETTLE_S)
        return server.rss_mib()


async def claim_costs(run: plan.Run, installation: relay.Installation) -> dict[int, float]:
    """Median ms to lease 64 at each backlog size, growing one database."""
    costs: dict[int, float] = {}
    store = installation.open_store()
    await store.open()
    try:
        loaded = 0
        for size in run.sizes.backlogs:
            await backlog.preload(
                store,
                installation.template.inputs[relay.BUCKET],
                count=size - loaded,
                start=loaded,
                prefix="backlog",
                progress=_progress,
            )
            loaded = size
            costs[size] = await backlog.lease_cost(store, installation.output_id())
    finally:
        await store.close()
    return costs


async def claim_and_memory(run: plan.Run) -> list[figures.Figure]:
    installation = await run.installation("backlog")
    idle = await warm_rss(installation, "idle")
    costs = await claim_costs(run, installation)
    largest = max(costs)
    loaded = await warm_rss(installation, "loaded")
    smallest = min(costs)
    found = [
        figures.bound_figure(f"claim cost, {plan.count(smallest)} pending", costs[smallest], "ms")
    ]
    found += [
        figures.ratio_figure(
            f"claim cost, {plan.count(size)} pending",
            costs[size],
            "ms",
            f"{plan.count(smallest)} pending",
            costs[smallest],
            at_most=2,
        )
        for size in sorted(costs)
        if size != smallest
    ]
    n = plan.count(largest)
    return [
        *found,
        figures.bound_figure("server RSS idle", idle, "MiB", at_most=RSS_LIMIT_MIB),
        figures.bound_figure(f"server RSS, {n} pending", loaded, "MiB", at_most=RSS_LIMIT_MIB),
        figures.bound_figure(
            f"server RSS added by {n} pending",
            loaded - idle,
            "MiB",
            at_most=BACKLOG_RSS_MIB,
            baseline_name="idle",
            baseline_value=idle,
        ),
    ]


def _progress(loaded: int) -> None:
    if loaded % PROGRESS_EVERY == 0:
        print(f"bench: backlog: {loaded:,} events queued", file=sys.stderr, flush=True)


def fairness(per_bucket: dict[str, list[int]]) -> float:
    """The worst bucket's fewest deliveries to one stream over its most (1.0: even)."""
    worst = 1.0
    for counts in per_bucket.values():
        most = max(counts, default=0)
        worst = min(worst, min(counts) / most if most else 0.0)
    return worst


async def many_agents(run: plan.Run) -> list[figures.Figure]:
    sizes = run.sizes
    installation = await run.installation("agents")
    async with procs.Group(installation.folder) as group:
        server = await installation.serve(group)
        streams = await fleet(
            group,
            installation,
            relay.MANY,
            per_bucket=sizes.streams_per_bucket,
            max_in_flight=1,
            name="fleet",
        )
        connected = await streams.message(FLEET_TIMEOUT_S)
        await asyncio.sleep(SETTLE_S)
        idle_rss = server.rss_mib()
        urls = [installation.input_url(bucket) for bucket in relay.MANY]
        sent = await load.flood(
            group, "load", urls, connections=16, seconds=sizes.many_s, requests=sizes.many_events
        )
        await streams.send(f"expect {sent['ok']} {sizes.many_s}")
        tally = await streams.message(FLEET_TIMEOUT_S)
        await streams.wait(60)  # it closes its streams before it exits
    return _many_figures(run, connected, idle_rss, sent, tally)


def _many_figures(
    run: plan.Run,
    connected: dict[str, Any],
    idle_rss: float,
    sent: dict[str, Any],
    tally: dict[str, Any],
) -> list[figures.Figure]:
    total = len(relay.MANY) * run.sizes.streams_per_bucket
    if connected["connected"] != total:
        run.notes.append(f"many agents: {connected['connected']} of {total} streams connected")
    run.notes.append(
        f"many agents: {sent['ok']} webhooks accepted in {sent['seconds']:.1f} s "
        f"(at most {run.sizes.many_events} within {run.sizes.many_s:g} s), "
        f"{tally['delivered']} delivered"
    )
    if sent["ok"] < FAIR_SAMPLE * total:
        run.notes.append(
            f"many agents: fewer than {FAIR_SAMPLE} events per stream on average: the "
            "fairness figure is dominated by chance"
        )
    missing = sent["ok"] - tally["delivered"] + tally["duplicated"]
    ingest_rate = run.measured.get("ingest_rate")
    return [
        figures.bound_figure(
            f"server RSS, {total:,} idle agent streams", idle_rss, "MiB", at_most=RSS_LIMIT_MIB
        ),
        figures.bound_figure(f"{total:,} agent streams connected in", connected["seconds"], "s"),
        figures.bound_figure(
            f"ingest rate with {total:,} streams",
            sent["rate"],
            "req/s",
            baseline_name=None if ingest_rate is None else "durable ingest",
            baseline_value=ingest_rate,
        ),
        figures.bound_figure(
            "many agents: accepted events not delivered once", missing, "events", at_most=0
        ),
        figures.bound_figure(
            "many agents: fairness min/max per stream",
            fairness(tally["per_bucket"]),
            "ratio",
            at_least=0.9,
        ),
    ]
