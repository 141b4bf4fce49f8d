"""Delivery figures: webhooks going through relay-agent to a target, against baselines.

  end-to-end latency    ingress -> agent -> target at 20 % of the measured ingest rate;
                        goal p50 <= direct p50 + 3 ms, p99 <= 3 x direct p99
  drain rate            a backlog queued while no agent ran, then one agent with a fast
                        target; goal >= 80 % of grpc-window, every event delivered once
  fan-out               one event to 10 outputs (one agent, a stream per output);
                        goal >= 40 % of the single-output drain in deliveries/s
  standard workloads    bench.load's own workloads (burst, outage, paced), the forwarder
                        stopped and started by the suite: lost must be 0

Baselines: `direct` is the load generator posting straight to its own sink, the target
the agent forwards to (the cost of one HTTP hop); `grpc-window` is bench.grpc_window.
The target is always the load generator's sink, which records each arrival by the id the
generator (or the preload) put in the request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import backlog, figures, load, plan, procs, relay

LATENCY_SHARE = 0.2  # of the measured max ingest rate
FALLBACK_RATE = 100.0  # req/s, when the ingest scenario did not run
AGENT_IN_FLIGHT = 64
MIN_DRAIN_RATE = 200.0  # events/s: below this a drain counts as stuck (bounds its wait)


async def _agent_ready(
    group: procs.Group, installation: relay.Installation, forward: str, name: str
) -> procs.Child:
    """A relay-agent forwarding to `forward`, once its stream is open (its /healthz)."""
    metrics = procs.free_port()
    agent = await installation.agent(
        group, forward, "--metrics-listen", f"127.0.0.1:{metrics}", name=name
    )
    await procs.wait_http(f"http://127.0.0.1:{metrics}/healthz", agent)
    return agent


async def _paced(group: procs.Group, url: str, sink_port: int, rate: float, seconds: float) -> Any:
    child = await load.spawn(
        group,
        "load",
        "--workload=latency",
        f"--ingest-url={url}",
        f"--sink-port={sink_port}",
        f"--rate={rate}",
        f"--seconds={seconds}",
    )
    await child.message(60)  # the sink is up
    return await child.message(seconds + 120)


async def latency(run: plan.Run) -> list[figures.Figure]:
    ingest_rate = run.measured.get("ingest_rate")
    rate = round(LATENCY_SHARE * ingest_rate, 1) if ingest_rate else FALLBACK_RATE
    seconds = run.sizes.latency_s
    run.notes.append(f"latency workload: {rate:g} req/s for {seconds:g} s")
    async with procs.Group(run.scratch("latency-direct")) as group:
        port = procs.free_port()
        direct = await _paced(group, f"http://127.0.0.1:{port}/direct", port, rate, seconds)
    installation = await run.installation("latency")
    async with procs.Group(installation.folder) as group:
        await installation.serve(group)
        port = procs.free_port()
        await _agent_ready(group, installation, f"http://127.0.0.1:{port}", "agent")
        through = await _paced(group, installation.input_url(), port, rate, seconds)
    for what, result in (("direct", direct), ("end-to-end", through)):
        if result["lost"] or result["errors"]:
            run.notes.append(f"{what} latency: lost {result['lost']}, errors {result['errors']}")
    p50, p99 = through["latency_ms"]["p50"], through["latency_ms"]["p99"]
    base50, base99 = direct["latency_ms"]["p50"], direct["latency_ms"]["p99"]
    return [
        figures.bound_figure(
            "end-to-end latency p50",
            p50,
            "ms",
            at_most=base50 + 3,
            baseline_name="direct p50",
            baseline_value=base50,
            goal="<= direct p50 + 3 ms",
        ),
        figures.ratio_figure("end-to-end latency p99", p99, "ms", "direct p99", base99, at_most=3),
    ]


async def grpc_window(run: plan.Run) -> float:
    """Messages/s through a bare grpc.aio stream, 64 in flight, acks back."""
    seconds = run.sizes.window_s
    async with procs.Group(run.scratch("grpc-window")) as group:
        port = str(procs.free_port())
        await (await group.python("window-server", "bench.grpc_window", "serve", port)).message(60)
        client = await group.python(
            "window-client", "bench.grpc_window", "drive", port, f"--seconds={seconds}"
        )
        result = await client.message(seconds + 60)
    return float(result["rate"])


StartAgent = Callable[[str], Awaitable[procs.Child]]


async def timed_drain(
    group: procs.Group, name: str, expect: int, start: StartAgent, *, per_path: bool = False
) -> tuple[dict[str, Any], float]:
    """Start the sink, then the agent(s) (`start(sink_url)`); the sink's report and the
    seconds from the agent's start to the last arrival."""
    port = procs.free_port()
    timeout = max(120.0, expect / MIN_DRAIN_RATE)
    args = ["--workload=sink", f"--sink-port={port}", f"--expect={expect}", f"--timeout={timeout}"]
    sink = await load.spawn(group, f"{name}-sink", *args, *(["--per-path"] if per_path else []))
    await sink.message(60)
    started_ns = time.monotonic_ns()  # CLOCK_MONOTONIC: the sink's clock too (Linux)
    agent = await start(f"http://127.0.0.1:{port}")
    result = await sink.message(timeout + 60)
    await agent.stop()
    return result, max(result["last_ns"] - started_ns, 1) / 1e9


async def _preload(installation: relay.Installation, drain: int, fan_out: int) -> None:
    store = installation.open_store()
    await store.open()
    try:
        inputs = installation.template.inputs
        await backlog.preload(store, inputs[relay.BUCKET], count=drain, prefix="drain")
        await backlog.preload(store, inputs[relay.FANOUT], count=fan_out, prefix="fanout")
    finally:
        await store.close()


def _fan_out_config(sink: str) -> list[str]:
    return [
        f'[[subscription]]\nbucket = "{relay.FANOUT}"\noutput = "{output}"\n'
        f'forward = "{sink}/{output}"\nmax_in_flight = {AGENT_IN_FLIGHT}'
        for output in relay.FANOUT_OUTPUTS
    ]


async def drain_and_fan_out(run: plan.Run) -> list[figures.Figure]:
    window = await grpc_window(run)
    n, m = run.sizes.drain_events, run.sizes.fanout_events
    installation = await run.installation("drain")
    await _preload(installation, n, m)
    async with procs.Group(installation.folder) as group:
        await installation.serve(group)
        drained, drain_s = await timed_drain(
            group, "drain", n, lambda url: installation.agent(group, url, name="agent")
        )
        copies = m * len(relay.FANOUT_OUTPUTS)
        fanned, fan_s = await timed_drain(
            group,
            "fanout",
            copies,
            lambda url: installation.agent_config(group, _fan_out_config(url), name="fanout"),
            per_path=True,
        )
    drain_rate = drained["unique"] / drain_s
    wrong = (n - drained["unique"]) + drained["duplicated"]
    if fanned["unique"] != copies or fanned["duplicated"]:
        run.notes.append(
            f"fan-out: {fanned['unique']} of {copies} deliveries, {fanned['duplicated']} twice"
        )
    return [
        figures.ratio_figure(
            f"drain rate ({plan.count(n)} queued)",
            drain_rate,
            "events/s",
            "grpc-window",
            window,
            at_least=0.8,
        ),
        figures.bound_figure(
            "drain: events not delivered exactly once", wrong, "events", at_most=0
        ),
        figures.ratio_figure(
            f"fan-out to 10 outputs ({plan.count(m)} events)",
            fanned["unique"] / fan_s,
            "deliveries/s",
            "single output",
            drain_rate,
            at_least=0.4,
        ),
    ]


async def standard_workloads(run: plan.Run) -> list[figures.Figure]:
    """bench.load's standard workloads against this relay; the suite stops/starts the agent."""
    installation = await run.installation("standard")
    results: dict[str, dict[str, Any]] = {}
    async with procs.Group(installation.folder) as group:
        await installation.serve(group)
        port = procs.free_port()
        sink = f"http://127.0.0.1:{port}"
        agent = await _agent_ready(group, installation, sink, "agent-1")
        args = [f"--ingest-url={installation.input_url()}", f"--sink-port={port}"]
        child = await load.spawn(group, "load", *args, *run.sizes.standard, stdin=True)
        for _ in range(5):  # three workloads and two pauses, in order
            message = await child.message(300)
            if message.get("pause") == "stop the forwarder":
                await agent.stop()
            elif message.get("pause") == "start the forwarder":
                agent = await _agent_ready(group, installation, sink, "agent-2")
            else:
                results[message["workload"]] = message
                continue
            await child.send("")
    if results.get("outage", {}).get("arrived_while_stopped"):
        run.notes.append("standard workloads: events arrived while the forwarder was stopped")
    lost = sum(r["lost"] for r in results.values())
    duplicated = sum(r["duplicated"] for r in results.values())
    return [
        figures.bound_figure("standard workloads: lost", lost, "events", at_most=0),
        figures.bound_figure("standard workloads: duplicated", duplicated, "events"),
        figures.bound_figure(
            "standard workloads: paced p50", results["paced"]["latency_ms"]["p50"], "ms"
        ),
    ]
