"""Several subscriptions in one agent process: one Agent, one destination each.

`Supervisor.run()` opens every destination, runs one `Agent` per subscription (each its
own stream, credit and timeouts) and returns once they have all stopped, after closing
the destinations. `stop()` stops them all gracefully. When one Agent fails (a
FatalError such as a refused token), the others are stopped too, and its error is
raised once they have finished their graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog

from relay_agent import agent, settings
from relay_agent import metrics as agent_metrics
from relay_agent.destinations import dir as dir_destination
from relay_agent.destinations import exec as exec_destination
from relay_agent.destinations import http

log = structlog.get_logger(__name__)

OpenableDestination = (
    http.HttpDestination | exec_destination.ExecDestination | dir_destination.DirDestination
)


class Runnable(Protocol):
    """What run_together() needs of an Agent."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


class Supervisor:
    """Runs one Agent per subscription until stopped or until one of them fails."""

    def __init__(
        self,
        agent_config: settings.AgentConfig,
        environ: Mapping[str, str],
        *,
        metrics: agent_metrics.AgentMetrics | None = None,
    ) -> None:
        self._config = agent_config
        self._metrics = metrics
        self._environ = dict(environ)  # what exec destinations pass on to their scripts
        self._agents: list[tuple[str, agent.Agent]] = []
        self._stopping = False
        self._started = False

    async def run(self) -> None:
        if self._started:
            raise RuntimeError("this Supervisor has already been started; create a new one")
        self._started = True
        several = len(self._config.subscriptions) > 1
        async with contextlib.AsyncExitStack() as stack:
            for subscription in self._config.subscriptions:
                destination = make_destination(subscription.destination, self._environ)
                await stack.enter_async_context(destination)  # opened now, closed last
                label = ",".join(subscription.agent.buckets) if several else ""
                self._agents.append(
                    (label, agent.Agent(subscription.agent, destination, metrics=self._metrics))
                )
                if self._stopping:
                    return  # stopped while destinations were being opened
            await run_together(self._agents)

    def stop(self) -> None:
        """Stop every Agent gracefully; safe at any time, any number of times."""
        self._stopping = True
        for _label, relay in self._agents:
            relay.stop()


def make_destination(
    destination: settings.DestinationSettings, environ: Mapping[str, str]
) -> OpenableDestination:
    match destination:
        case settings.HttpDestinationSettings():
            return http.HttpDestination(destination)
        case settings.ExecDestinationSettings():
            return exec_destination.ExecDestination(destination, environ)
        case settings.DirDestinationSettings():
            return dir_destination.DirDestination(destination)


async def run_together(runnables: Sequence[tuple[str, Runnable]]) -> None:
    """Run them until all have returned; the first to fail stops the others.

    Its error is raised once they have all finished. A label names the runnable in
    every log line it writes ("" for none).
    """
    tasks = [
        asyncio.create_task(_run_labelled(label, runnable), name=f"relay-agent-{index}")
        for index, (label, runnable) in enumerate(runnables)
    ]
    failure: BaseException | None = None
    pending: set[asyncio.Task[None]] = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if failure is None and (error := _failure(task)) is not None:
                    failure = error
                    log.error("subscription_failed", task=task.get_name(), error=str(error))
                    _stop_all(runnables)
    except asyncio.CancelledError:
        _stop_all(runnables)
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if failure is not None:
        raise failure


async def _run_labelled(label: str, runnable: Runnable) -> None:
    if label:
        # This task's own context: every log line of this agent names its buckets.
        structlog.contextvars.bind_contextvars(subscription=label)
    await runnable.run()


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    return None if task.cancelled() else task.exception()


def _stop_all(runnables: Sequence[tuple[str, Runnable]]) -> None:
    for _label, runnable in runnables:
        runnable.stop()
