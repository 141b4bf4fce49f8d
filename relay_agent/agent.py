"""The agent: hold a stream to the server and hand each delivery to a destination.

`Agent.run()` connects, reconnects forever with capped jittered backoff, and returns
only after its own cleanup; `Agent.stop()` (idempotent) starts the shutdown, always in
this order: stop taking new deliveries → give in-flight ones `shutdown_grace_s` →
cancel the rest → NACK what is unsettled → close the stream → close the channel.

Each Connect stream is served by a `_Session`: a reader task turns frames into delivery
tasks; a delivery task runs the destination while a heartbeat extends its lease every
lease_ms/3, then settles the outcome under `asyncio.shield`. A lease the server reports
lost is cancelled and never settled: work whose lease may have expired is never acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

import structlog

from relay_agent import connection, errors, models, settings
from relay_agent.destinations import base

log = structlog.get_logger(__name__)

SHUTDOWN_NACK_REASON = "agent shutting down"
# 0 would mean "the bucket's backoff" on the wire: another agent may take it at once.
SHUTDOWN_RETRY_AFTER_MS = 1
# How long settlements may take to be written before the stream is closed anyway.
SETTLE_TIMEOUT_S = 5.0

_T = TypeVar("_T")


class Agent:
    """Relays deliveries from the server to one destination until stopped."""

    def __init__(
        self, agent_settings: settings.AgentSettings, destination: base.Destination
    ) -> None:
        self._settings = agent_settings
        self._destination = destination
        self._stopping = asyncio.Event()
        self._started = False

    async def run(self) -> None:
        """Relay until stop(); raises FatalError when retrying cannot help."""
        if self._started:
            raise RuntimeError("this Agent has already been started; create a new one")
        self._started = True
        main = asyncio.create_task(self._reconnect_forever(), name="relay-agent-main")
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
        if not self._stopping.is_set():
            log.info("shutting_down", grace_s=self._settings.shutdown_grace_s)
            self._stopping.set()

    async def _reconnect_forever(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            session = _Session(self._settings, self._destination, self._stopping)
            try:
                await session.run()
            except errors.ConnectionLost as exc:
                # A stream that got as far as Welcome was a success: start over.
                failures = 1 if session.welcomed else failures + 1
                delay = settings.reconnect_delay(
                    self._settings.reconnect, failures, random.random()
                )
                log.warning(
                    "disconnected", error=str(exc), failures=failures, retry_in_s=round(delay, 3)
                )
                await self._sleep(delay)

    async def _sleep(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)


@dataclasses.dataclass(slots=True, eq=False)
class _Lease:
    """One delivery held by a session, from receipt until it is settled or lost."""

    delivery: models.Delivery
    task: asyncio.Task[None] | None = None  # None: received while stopping, never started
    settling: bool = False  # an outcome is on its way: nothing else may settle it
    lost: bool = False  # the server gave the lease up: it must never be settled


class _Session:
    """One Connect stream and the deliveries received on it."""

    def __init__(
        self,
        agent_settings: settings.AgentSettings,
        destination: base.Destination,
        stopping: asyncio.Event,
    ) -> None:
        self._settings = agent_settings
        self._destination = destination
        self._stopping = stopping
        self._conn = connection.Connection(agent_settings)
        self._leases: dict[str, _Lease] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._settlements: set[asyncio.Task[None]] = set()
        self._lease_ms = models.DEFAULT_LEASE_MS
        self._slots = asyncio.Semaphore(agent_settings.max_in_flight)
        self.welcomed = False

    async def run(self) -> None:
        """Serve the stream until stopped (returns) or until it breaks (raises)."""
        log.info("connecting", server=self._settings.server, buckets=list(self._settings.buckets))
        async with self._conn:
            welcome = await _unless_stopped(self._conn.open(), self._stopping)
            if welcome is None:
                return
            self._on_welcome(welcome)
            with structlog.contextvars.bound_contextvars(session_id=welcome.session_id):
                reader = asyncio.create_task(self._read(), name="relay-agent-reader")
                try:
                    await self._serve(reader)
                finally:
                    await self._abandon(reader)

    def _on_welcome(self, welcome: models.Welcome) -> None:
        self.welcomed = True
        self._lease_ms = welcome.lease_ms
        granted = welcome.max_in_flight or self._settings.max_in_flight
        self._slots = asyncio.Semaphore(granted)
        log.info(
            "connected",
            session_id=welcome.session_id,
            buckets=list(welcome.buckets or self._settings.buckets),
            lease_ms=welcome.lease_ms,
            max_in_flight=granted,
            server_version=welcome.server_version,
        )

    async def _serve(self, reader: asyncio.Task[None]) -> None:
        stop_wait = asyncio.create_task(self._stopping.wait(), name="relay-agent-stop-wait")
        try:
            await asyncio.wait({reader, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all([stop_wait])
        if reader.done():
            reader.result()  # the reader only ends by raising: ConnectionLost or FatalError
        await self._shutdown(reader)

    async def _shutdown(self, reader: asyncio.Task[None]) -> None:
        unfinished = await self._drain(reader)
        await _cancel_all(unfinished)
        await self._wait_settlements()
        self._nack_unsettled()
        await self._wait_settlements()
        await self._conn.close()

    async def _drain(self, reader: asyncio.Task[None]) -> set[asyncio.Task[None]]:
        """Wait for in-flight deliveries until the grace runs out or the stream breaks."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.shutdown_grace_s
        pending = {task for task in self._tasks if not task.done()}
        log.info("draining", in_flight=len(pending), grace_s=self._settings.shutdown_grace_s)
        while pending and not reader.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            done, _ = await asyncio.wait(
                pending | {reader}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
        return pending

    def _nack_unsettled(self) -> None:
        nack = models.Nack(retry_after_ms=SHUTDOWN_RETRY_AFTER_MS, reason=SHUTDOWN_NACK_REASON)
        for lease in list(self._leases.values()):
            if not (lease.settling or lease.lost):
                self._start_settlement(lease, nack)

    async def _abandon(self, reader: asyncio.Task[None]) -> None:
        """Whatever still runs when the stream is gone cannot be settled any more."""
        running = [task for task in self._tasks if not task.done()]
        if running:
            # The server returns these leases to the queue when the stream ends.
            log.warning("deliveries_abandoned", count=len(running))
        await _cancel_all(running)
        await _cancel_all([reader])
        await self._wait_settlements()

    async def _read(self) -> None:
        while True:
            for item in await self._conn.receive():
                if isinstance(item, models.LeaseLost):
                    self._on_lease_lost(item)
                else:
                    self._on_delivery(item)

    def _on_delivery(self, delivery: models.Delivery) -> None:
        log.info("delivery_received", **delivery.log_context())
        if delivery.lease_id in self._leases:
            log.warning("duplicate_lease", lease_id=delivery.lease_id)
            return
        lease = _Lease(delivery=delivery)
        self._leases[delivery.lease_id] = lease
        if self._stopping.is_set():
            return  # not started: NACKed when the shutdown gets there
        lease.task = asyncio.create_task(
            self._handle(lease), name=f"relay-agent-delivery-{delivery.lease_id}"
        )
        self._tasks.add(lease.task)
        lease.task.add_done_callback(self._task_done)

    def _on_lease_lost(self, notice: models.LeaseLost) -> None:
        for lease_id in notice.lease_ids:
            lease = self._leases.get(lease_id)
            in_progress = lease is not None and not lease.settling
            log.warning(
                "lease_lost", lease_id=lease_id, in_progress=in_progress, message=notice.message
            )
            if lease is None or not in_progress:
                continue
            lease.lost = True
            del self._leases[lease_id]
            if lease.task is not None:
                lease.task.cancel()

    async def _handle(self, lease: _Lease) -> None:
        delivery = lease.delivery
        structlog.contextvars.bind_contextvars(**delivery.log_context())
        async with self._slots:
            if self._stopping.is_set():
                return  # never started: NACKed by the shutdown
            outcome = await self._attempt(delivery)
        settlement = self._start_settlement(lease, outcome)
        await asyncio.shield(settlement)

    async def _attempt(self, delivery: models.Delivery) -> models.Outcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        heartbeat = asyncio.create_task(
            self._heartbeat(delivery), name=f"relay-agent-heartbeat-{delivery.lease_id}"
        )
        try:
            return await self._call_destination(delivery)
        finally:
            await _cancel_all([heartbeat])
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

    async def _heartbeat(self, delivery: models.Delivery) -> None:
        """While the destination works, extend the lease every third of its length."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self._conn.extend([delivery.lease_id], self._lease_ms)
            except errors.ConnectionLost:
                return  # the reader sees the broken stream and ends the session
            log.info("lease_extended", extend_ms=self._lease_ms)

    def _start_settlement(self, lease: _Lease, outcome: models.Outcome) -> asyncio.Task[None]:
        lease.settling = True
        task = asyncio.create_task(
            self._settle(lease.delivery, outcome),
            name=f"relay-agent-settle-{lease.delivery.lease_id}",
        )
        self._settlements.add(task)
        task.add_done_callback(self._settlement_done)
        return task

    async def _settle(self, delivery: models.Delivery, outcome: models.Outcome) -> None:
        lease_id = delivery.lease_id
        with structlog.contextvars.bound_contextvars(**delivery.log_context()):
            try:
                await self._send_outcome(lease_id, outcome)
            except errors.ConnectionLost as exc:
                # The server returns the lease to the queue when the stream ends.
                log.warning("settlement_not_sent", outcome=_outcome_name(outcome), error=str(exc))
                return
            finally:
                self._leases.pop(lease_id, None)
            _log_outcome(outcome)

    async def _send_outcome(self, lease_id: str, outcome: models.Outcome) -> None:
        match outcome:
            case models.Ack():
                await self._conn.ack([lease_id])
            case models.Nack(retry_after_ms=retry_after_ms, reason=reason):
                await self._conn.nack(lease_id, retry_after_ms, reason)
            case models.Reject(reason=reason):
                await self._conn.reject(lease_id, reason)

    async def _wait_settlements(self) -> None:
        if self._settlements:
            await asyncio.wait(set(self._settlements), timeout=SETTLE_TIMEOUT_S)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        _log_unexpected(task)

    def _settlement_done(self, task: asyncio.Task[None]) -> None:
        self._settlements.discard(task)
        _log_unexpected(task)


def _log_outcome(outcome: models.Outcome) -> None:
    match outcome:
        case models.Ack():
            log.info("delivery_acked")
        case models.Nack(retry_after_ms=retry_after_ms, reason=reason):
            log.info("delivery_nacked", reason=reason, retry_after_ms=retry_after_ms)
        case models.Reject(reason=reason):
            log.warning("delivery_rejected", reason=reason)


def _outcome_name(outcome: models.Outcome) -> str:
    return type(outcome).__name__.lower()


def _log_unexpected(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task_failed", task=task.get_name(), exc_info=exc)


async def _cancel_all(tasks: Collection[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_stopped(work: Awaitable[_T], stopping: asyncio.Event) -> _T | None:
    """The result of `work`, or None if a stop is requested first (work is cancelled)."""
    work_task = asyncio.ensure_future(work)
    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel_all([task for task in (work_task, stop_wait) if not task.done()])
    if work_task.cancelled():
        return None
    return work_task.result()
