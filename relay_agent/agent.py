"""The agent: hand each event from a Consumer to a destination and settle its outcome.

`Agent.run()` returns only after its own cleanup; `Agent.stop()` (idempotent) starts the
shutdown, always in this order: stop taking new events → give in-flight ones
`shutdown_grace_s` → cancel the rest → NACK what is unsettled → close the stream.

Connecting, reconnecting, heartbeats and flow control belong to the Consumer (the same
one the Python SDK offers): the consumer hands out at most max_in_flight unsettled events,
so the agent runs one task per event it is given. A lease the server reports lost cancels
its task (`Event.guard()`) and is never settled: work whose lease may have expired is
never acked.
"""

from __future__ import annotations

import asyncio

import structlog

from relay_agent import consumer, errors, models, settings
from relay_agent import metrics as agent_metrics
from relay_agent.destinations import base

log = structlog.get_logger(__name__)

SHUTDOWN_NACK_REASON = consumer.SHUTDOWN_NACK_REASON
SHUTDOWN_RETRY_AFTER_MS = consumer.SHUTDOWN_RETRY_AFTER_MS


class Agent:
    """Relays deliveries from the server to one destination until stopped."""

    def __init__(
        self,
        agent_settings: settings.AgentSettings,
        destination: base.Destination,
        *,
        metrics: agent_metrics.AgentMetrics | None = None,
    ) -> None:
        self._settings = agent_settings
        self._destination = destination
        self._metrics = metrics
        self._consumer = consumer.Consumer(agent_settings, metrics=metrics)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._started = False

    async def run(self) -> None:
        """Relay until stop(); raises FatalError when retrying cannot help."""
        if self._started:
            raise RuntimeError("this Agent has already been started; create a new one")
        self._started = True
        main = asyncio.create_task(self._relay(), name="relay-agent-main")
        try:
            await asyncio.shield(main)
        except asyncio.CancelledError:
            # Being cancelled is a stop request: shut down gracefully, then re-raise.
            # A second cancellation lands on `main` itself and cuts the grace short.
            self.stop()
            await main
            raise
        finally:
            log.info("stopped")

    def stop(self) -> None:
        """Ask run() to finish gracefully; safe to call at any time, any number of times."""
        if not self._stopping:
            log.info("shutting_down", grace_s=self._settings.shutdown_grace_s)
            self._stopping = True
            self._consumer.stop()

    async def _relay(self) -> None:
        async with self._consumer as events:
            try:
                async for event in events:
                    self._start(event)
            finally:
                await self._drain()
        # Leaving `async with` NACKs whatever is unsettled and closes the stream.

    def _start(self, event: consumer.Event) -> None:
        task = asyncio.create_task(
            self._handle(event), name=f"relay-agent-delivery-{event.lease_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _drain(self) -> None:
        """Give in-flight deliveries the grace, then cancel what is left."""
        pending = {task for task in self._tasks if not task.done()}
        log.info("draining", in_flight=len(pending), grace_s=self._settings.shutdown_grace_s)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self._settings.shutdown_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, event: consumer.Event) -> None:
        structlog.contextvars.bind_contextvars(**event.delivery.log_context())
        outcome: models.Outcome | None = None
        if self._metrics is not None:
            self._metrics.delivery_started()
        try:
            async with event.guard():
                outcome = await self._attempt(event.delivery)
            await event.settle(outcome)
        except errors.LeaseLost:
            outcome = None  # logged by the consumer; the server delivers the event again
        finally:
            if self._metrics is not None:
                self._metrics.delivery_finished(event.bucket, outcome)

    async def _attempt(self, delivery: models.Delivery) -> models.Outcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await self._call_destination(delivery)
        finally:
            structlog.contextvars.bind_contextvars(
                duration_ms=round((loop.time() - started) * 1000)
            )

    async def _call_destination(self, delivery: models.Delivery) -> models.Outcome:
        try:
            return await self._destination.deliver(delivery)
        except Exception:
            # A destination bug must not take the agent down: report it and retry later.
            log.exception("destination_failed")
            return models.Nack(reason="agent error: the destination raised an exception")

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task_failed", task=task.get_name(), exc_info=exc)
