"""The Python SDK: receive events from a Stowhook server in your own asyncio code.

    agent_settings = relay_agent.AgentSettings(
        server="relay.example.com:7443", token=token, buckets=("github",)
    )
    async with relay_agent.Consumer(agent_settings) as consumer:
        async for event in consumer:
            try:
                await handle(event.json())
            except TemporaryFailure as exc:
                await event.nack(retry_after=30, reason=str(exc))
            else:
                await event.ack()

What the consumer does for its caller:

* one outbound Connect stream, reconnected forever with `settings.reconnect`'s capped,
  jittered backoff; a FatalError (token or bucket refused) ends the iteration by raising;
* flow control: the server leases at most `max_in_flight` events to the stream, and the
  iteration hands out a new one only while fewer than that are handed out and unsettled;
* heartbeats: every lease_ms/3, one Extend frame moves the deadline of every event the
  consumer holds unsettled (handed out or still buffered);
* a lease the server reports lost, or whose stream broke, is never settled: ack() raises
  LeaseLost, and `async with event.guard():` cancels the work in progress;
* close() (or leaving `async with`): stop handing out events, NACK every unsettled one
  (retry after 1 ms, so another agent may take it at once), close the stream.

Settlements run as tracked tasks under `asyncio.shield`: a caller cancelled while its
ACK is being written cannot lose the ACK.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import enum
import itertools
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, TypeVar

import structlog

from relay_agent import connection, errors, models, settings
from relay_agent import logging as agent_logging
from relay_agent import metrics as agent_metrics

log = structlog.get_logger(__name__)

SHUTDOWN_NACK_REASON = "agent shutting down"
# 0 would mean "the bucket's backoff" on the wire: another agent may take it at once.
SHUTDOWN_RETRY_AFTER_MS = 1
# How long settlements may take to be written before the stream is closed anyway.
SETTLE_TIMEOUT_S = 5.0

_T = TypeVar("_T")


class _State(enum.Enum):
    BUFFERED = "buffered"  # received, not handed out yet
    HANDED_OUT = "handed_out"  # given to the caller, not settled yet
    SETTLING = "settling"  # an outcome is on its way: nothing else may settle it
    SETTLED = "settled"  # the outcome was written to the stream
    LOST = "lost"  # the lease is gone (server notice, broken stream): never settled


_UNSETTLED = (_State.BUFFERED, _State.HANDED_OUT)


class Event:
    """One leased webhook: read it, then settle it once with ack, nack or reject."""

    __slots__ = (
        "_extend_ms",
        "_lost_callbacks",
        "_lost_reason",
        "_released",
        "_state",
        "_stream",
        "delivery",
    )

    def __init__(self, delivery: models.Delivery, stream: _Stream) -> None:
        self.delivery = delivery
        self._stream = stream
        self._state = _State.BUFFERED
        self._extend_ms: int | None = None  # set by extend(): the heartbeat keeps it
        self._released = False  # NACKed by the consumer itself when it closed
        self._lost_reason = ""
        self._lost_callbacks: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return (
            f"<Event id={self.id} lease_id={self.lease_id} attempt={self.attempt} "
            f"state={self._state.value}>"
        )

    @property
    def id(self) -> str:
        return self.delivery.event_id

    @property
    def lease_id(self) -> str:
        """The lease, "<delivery_id>.<attempt>": settling it settles this attempt only."""
        return self.delivery.lease_id

    @property
    def bucket(self) -> str:
        return self.delivery.bucket

    @property
    def input_id(self) -> str:
        return self.delivery.input_id

    @property
    def method(self) -> str:
        return self.delivery.method

    @property
    def path(self) -> str:
        """The path tail after /in/{input_id}: "" or starting with "/"."""
        return self.delivery.path

    @property
    def query(self) -> str:
        """The raw query string, without "?"."""
        return self.delivery.query

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """As received: in order, duplicates kept."""
        return self.delivery.headers

    @property
    def body(self) -> bytes:
        return self.delivery.body

    @property
    def received_at(self) -> datetime.datetime:
        return self.delivery.received_at

    @property
    def attempt(self) -> int:
        """1 for the first try."""
        return self.delivery.attempt

    @property
    def replay(self) -> bool:
        """True when an operator replayed a stored event."""
        return self.delivery.replay

    @property
    def reply_wanted(self) -> bool:
        """The sender waits for this event's answer (input response mode "wait"): see reply()."""
        return self.delivery.reply_wanted

    @property
    def lease_deadline(self) -> datetime.datetime:
        """The server's deadline when the event was leased (heartbeats move it on)."""
        return self.delivery.lease_deadline

    @property
    def settled(self) -> bool:
        """ack, nack or reject was called (or the consumer released it on close)."""
        return self._state in (_State.SETTLING, _State.SETTLED)

    @property
    def lost(self) -> bool:
        """The lease is gone: the event cannot be settled and will be delivered again."""
        return self._state is _State.LOST

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError if it is not JSON)."""
        return json.loads(self.body)

    async def ack(self) -> None:
        """The event is handled: the delivery is done."""
        await self.settle(models.Ack())

    async def nack(self, retry_after: float | None = None, reason: str = "") -> None:
        """Handling failed: try again after `retry_after` seconds (None: the bucket's backoff).

        The reason is stored as the delivery's last error (operators see it).
        """
        await self.settle(models.Nack(retry_after_ms=retry_after_ms(retry_after), reason=reason))

    async def reply(
        self, status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> None:
        """Settle with an HTTP answer, relayed to the sender when it waits (reply_wanted).

        2xx acknowledges the event like ack(); any other status is a failed attempt,
        retried like nack(). Bodies over 1 MiB reach the sender as a 502.
        """
        response = models.Response(status=status, headers=tuple(headers), body=body)
        if 200 <= status < 300:
            await self.settle(models.Ack(response=response))
        else:
            await self.settle(models.Nack(reason=f"HTTP {status}", response=response))

    async def reject(self, reason: str) -> None:
        """Poison: the event can never be handled; dead-letter it without retrying."""
        await self.settle(models.Reject(reason=reason))

    async def settle(self, outcome: models.Outcome) -> None:
        """Send an outcome; returns once it is written to the stream.

        Raises AlreadySettled if the event was settled before, LeaseLost if the lease is
        gone (the server will deliver the event again). Being cancelled meanwhile does not
        stop the outcome from being sent.
        """
        await asyncio.shield(self._stream.start_settlement(self, outcome))

    async def extend(self, seconds: float | None = None) -> None:
        """Move the lease deadline `seconds` from now (default: the stream's lease length).

        The consumer's heartbeats keep extending by the same length from then on. Only
        needed with `Consumer(auto_extend=False)` or to hold an event for longer.
        """
        await self._stream.extend(self, extend_ms(seconds, self._stream.lease_ms))

    def guard(self) -> _Guard:
        """`async with event.guard():` runs a block that is cancelled, raising LeaseLost,
        if the lease is lost meanwhile.

        Work whose lease is gone is being handed to someone else: stop it early.
        """
        return _Guard(self)

    # ---- state changes, driven by the consumer ------------------------------------------

    def _hand_out(self) -> bool:
        if self._state is not _State.BUFFERED:
            return False  # lost while it waited in the buffer
        self._state = _State.HANDED_OUT
        return True

    def _begin_settling(self) -> bool:
        """Claim the right to settle; returns whether the event was handed out."""
        self._check_unsettled()
        was_handed_out = self._state is _State.HANDED_OUT
        self._state = _State.SETTLING
        return was_handed_out

    def _check_unsettled(self) -> None:
        if self._state is _State.LOST:
            raise self._lost_error()
        if self._state in (_State.SETTLING, _State.SETTLED):
            if self._released:
                self._lost_reason = "the consumer was closed and released it"
                raise self._lost_error()
            raise errors.AlreadySettled(
                f"event {self.id} (lease {self.lease_id}) has already been settled",
                lease_id=self.lease_id,
            )

    def _lose(self, reason: str) -> bool:
        """The lease is gone; returns whether the event was handed out."""
        was_handed_out = self._state is _State.HANDED_OUT
        self._state = _State.LOST
        self._lost_reason = reason
        for callback in list(self._lost_callbacks):
            callback()
        return was_handed_out

    def _lost_error(self) -> errors.LeaseLost:
        return errors.LeaseLost(
            f"the lease of event {self.id} (lease {self.lease_id}) is lost: "
            f"{self._lost_reason}; the server will deliver the event again",
            lease_id=self.lease_id,
        )


class _Guard:
    """Event.guard(): an async context manager written out (not a generator), since the
    agent enters one per delivery."""

    __slots__ = ("_cancelled", "_event", "_task")

    def __init__(self, event: Event) -> None:
        self._event = event
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False

    async def __aenter__(self) -> Event:
        self._event._check_unsettled()
        self._task = asyncio.current_task()
        if self._task is None:
            raise RuntimeError("Event.guard() must be used inside a task")
        self._event._lost_callbacks.append(self._cancel)
        return self._event

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._event._lost_callbacks.remove(self._cancel)
        if (
            exc_type is not None
            and issubclass(exc_type, asyncio.CancelledError)
            and self._cancelled
            and self._task is not None
            and self._task.uncancel() == 0
        ):
            raise self._event._lost_error() from None

    def _cancel(self) -> None:
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()


class Consumer:
    """Leases events from the server and hands them out through `async for`.

    Use it as `async with Consumer(settings) as consumer:`; see the module docstring.
    With auto_extend=False, handed-out events are only extended by `event.extend()`:
    the lease then acts as a watchdog for work that hangs.
    """

    def __init__(
        self,
        agent_settings: settings.AgentSettings,
        *,
        auto_extend: bool = True,
        metrics: agent_metrics.AgentMetrics | None = None,
    ) -> None:
        self._settings = agent_settings
        self._metrics = metrics
        self.auto_extend = auto_extend
        self._buffer: collections.deque[Event] = collections.deque()
        self._handed_out = 0  # handed out and unsettled: at most _limit
        self._limit = agent_settings.max_in_flight
        self._changed = asyncio.Event()  # something a waiter may care about happened
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()  # no more hand-outs, no more reconnects
        self._closing = asyncio.Event()  # release the unsettled events, close the stream
        self._release_reason = SHUTDOWN_NACK_REASON  # the NACK reason of that release
        self._runner: asyncio.Task[None] | None = None
        self.last_error: str | None = None  # why the last stream ended or failed to open

    async def __aenter__(self) -> Consumer:
        self.start()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Event:
        """The next event; waits while max_in_flight events are handed out and unsettled.

        Ends after stop() or close(); raises FatalError when retrying cannot help.
        Safe to cancel (e.g. with asyncio.timeout): no event is lost by it.
        """
        runner = self._started()
        while not self._stopping.is_set():
            _raise_failure(runner)
            if runner.done():
                break
            event = self._take()
            if event is not None:
                return event
            self._changed.clear()
            await self._changed.wait()
        raise StopAsyncIteration

    @property
    def connected(self) -> bool:
        """A stream to the server is open (Welcome received)."""
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting in the background; `async with` calls this."""
        if self._runner is not None or self._closing.is_set():
            raise RuntimeError("a Consumer can only be started once; create a new one")
        self._runner = asyncio.create_task(self._run(), name="relay-consumer")
        self._runner.add_done_callback(_retrieve)

    async def wait_connected(self) -> bool:
        """True once a stream is open, False if stopped first; FatalError if it cannot be.

        Bound it with asyncio.timeout(): an unreachable server is retried forever.
        """
        runner = self._started()
        while not self._connected.is_set():
            _raise_failure(runner)
            if self._stopping.is_set() or runner.done():
                return False
            self._changed.clear()
            await self._changed.wait()
        return True

    def stop(self) -> None:
        """Hand out no more events (the iteration ends); unsettled ones may still be settled.

        Idempotent, and safe from a signal handler.
        """
        if not self._stopping.is_set():
            self._stopping.set()
            self._wake()

    async def close(self, *, reason: str = SHUTDOWN_NACK_REASON) -> None:
        """Stop, NACK every unsettled event (retry after 1 ms), close the stream. Idempotent.

        `reason` becomes those deliveries' last error (the first call's reason counts).
        """
        self.stop()
        if not self._closing.is_set():
            self._release_reason = reason
            self._closing.set()
        if self._runner is not None:
            # wait(), not await: a caller cancelled here must not cancel the release.
            await asyncio.wait({self._runner})

    def _started(self) -> asyncio.Task[None]:
        if self._runner is None:
            raise RuntimeError("start the Consumer first: `async with Consumer(...) as consumer:`")
        return self._runner

    def _take(self) -> Event | None:
        while self._buffer and self._handed_out < self._limit:
            event = self._buffer.popleft()
            if event._hand_out():
                self._handed_out += 1
                return event
        return None

    def _wake(self) -> None:
        self._changed.set()

    # ---- called by the current stream ---------------------------------------------------

    def _on_connected(self, granted: int) -> None:
        if self._metrics is not None and not self._connected.is_set():
            self._metrics.stream_opened()
        self._limit = granted
        self.last_error = None
        self._connected.set()
        self._wake()

    def _on_event(self, event: Event) -> None:
        self._buffer.append(event)
        self._wake()

    def _on_slot_freed(self) -> None:
        self._handed_out -= 1
        self._wake()

    def _on_disconnected(self) -> None:
        if self._metrics is not None and self._connected.is_set():
            self._metrics.stream_closed()
        self._connected.clear()
        self._buffer = collections.deque(e for e in self._buffer if e._state is _State.BUFFERED)
        self._wake()

    # ---- the background task ------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        servers = self._settings.servers
        try:
            for turn in itertools.count():
                if self._stopping.is_set():
                    break
                # Several replicas: each reconnect dials the next one (any replica serves).
                server = servers[turn % len(servers)]
                stream = _Stream(self._settings, self, self._closing, server)
                try:
                    await stream.run()
                except errors.ConnectionLost as exc:
                    # A stream that got as far as Welcome was a success: start over.
                    failures = 1 if stream.welcomed else failures + 1
                    await self._back_off(exc, failures)
        except errors.FatalError as exc:
            self.last_error = str(exc)
            raise
        finally:
            self._connected.clear()
            self._wake()

    async def _back_off(self, exc: errors.ConnectionLost, failures: int) -> None:
        self.last_error = str(exc)
        delay = settings.reconnect_delay(self._settings.reconnect, failures, random.random())
        log.warning("disconnected", error=str(exc), failures=failures, retry_in_s=round(delay, 3))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)


class _Stream:
    """One Connect stream and the events received on it."""

    def __init__(
        self,
        agent_settings: settings.AgentSettings,
        owner: Consumer,
        closing: asyncio.Event,
        server: str,
    ) -> None:
        self._settings = agent_settings
        self._owner = owner
        self._closing = closing
        self._conn = connection.Connection(agent_settings, server)
        self._events: dict[str, Event] = {}  # by lease id: every event not settled or lost
        self._paused = False  # Credit{0} sent: the server pushes nothing more
        self._settlements: set[asyncio.Task[None]] = set()
        self.lease_ms = models.DEFAULT_LEASE_MS
        self.session_id = ""
        self.welcomed = False

    async def run(self) -> None:
        """Serve the stream until closed (returns) or until it breaks (raises)."""
        log.info("connecting", server=self._conn.server, buckets=list(self._settings.buckets))
        async with self._conn:
            welcome = await _unless_set(self._conn.open(), self._owner._stopping)
            if welcome is None:
                return
            with structlog.contextvars.bound_contextvars(session_id=welcome.session_id):
                self._on_welcome(welcome)
                reader = asyncio.create_task(self._read(), name="relay-consumer-reader")
                heartbeat = asyncio.create_task(self._heartbeat(), name="relay-consumer-heartbeat")
                try:
                    await self._serve(reader)
                finally:
                    await self._abandon([heartbeat, reader])

    def _on_welcome(self, welcome: models.Welcome) -> None:
        self.welcomed = True
        self.session_id = welcome.session_id
        self.lease_ms = welcome.lease_ms
        granted = welcome.max_in_flight or self._settings.max_in_flight
        log.info(
            "connected",
            session_id=welcome.session_id,
            buckets=list(welcome.buckets or self._settings.buckets),
            lease_ms=welcome.lease_ms,
            max_in_flight=granted,
            server_version=welcome.server_version,
        )
        self._owner._on_connected(granted)

    async def _serve(self, reader: asyncio.Task[None]) -> None:
        closing = asyncio.create_task(self._closing.wait(), name="relay-consumer-close-wait")
        stopping = asyncio.create_task(
            self._owner._stopping.wait(), name="relay-consumer-stop-wait"
        )
        try:
            done, _ = await asyncio.wait(
                {reader, closing, stopping}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping in done and not reader.done() and not closing.done():
                # Stopping: pause the stream so nothing new arrives while work finishes.
                await self._pause()
                await asyncio.wait({reader, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all([closing, stopping])
        if reader.done():
            reader.result()  # the reader only ends by raising: ConnectionLost or FatalError
        await self._release_and_close()

    async def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            await self._conn.credit(0)

    async def _release_and_close(self) -> None:
        """NACK every unsettled event (available again at once), then half-close at once.

        Credit{0} goes first and the half-close follows the NACKs in the same write:
        otherwise the server, having applied a NACK before it saw the stream end, could
        lease the event straight back to this stream, which would then hand it back as
        disconnected (one more attempt, and a backoff).
        """
        # Credit{0} first: the server applies it before the NACKs, so it cannot lease
        # a released event straight back to this stream.
        await self._pause()
        nack = models.Nack(
            retry_after_ms=SHUTDOWN_RETRY_AFTER_MS, reason=self._owner._release_reason
        )
        for event in list(self._events.values()):
            if event._state in _UNSETTLED:
                event._released = True
                self.start_settlement(event, nack)
        await asyncio.sleep(0)  # each settlement task queues its frame in its first step
        await self._conn.close()  # writes what is queued, then half-closes
        await self._wait_settlements()

    async def _abandon(self, tasks: Collection[asyncio.Task[None]]) -> None:
        """Whatever is unsettled when the stream is gone cannot be settled any more."""
        await _cancel_all(tasks)
        unsettled = [e for e in self._events.values() if e._state in _UNSETTLED]
        handed_out = sum(e._state is _State.HANDED_OUT for e in unsettled)
        if handed_out:
            # The server returns these leases to the queue when the stream ends.
            log.warning("deliveries_abandoned", count=handed_out)
        for event in unsettled:
            self._lose(event, "the stream to the server ended")
        await self._wait_settlements()
        self._owner._on_disconnected()

    async def _read(self) -> None:
        while True:
            for item in await self._conn.receive():
                if isinstance(item, models.LeaseLost):
                    self._on_lease_lost(item)
                else:
                    self._on_delivery(item)

    def _on_delivery(self, delivery: models.Delivery) -> None:
        if delivery.lease_id in self._events:
            log.warning("duplicate_lease", lease_id=delivery.lease_id)
            return
        if agent_logging.enabled(logging.INFO):
            log.info("delivery_received", **delivery.log_context())
        event = Event(delivery, self)
        self._events[delivery.lease_id] = event
        self._owner._on_event(event)

    def _on_lease_lost(self, notice: models.LeaseLost) -> None:
        for lease_id in notice.lease_ids:
            event = self._events.get(lease_id)
            in_progress = event is not None and event._state in _UNSETTLED
            log.warning(
                "lease_lost", lease_id=lease_id, in_progress=in_progress, message=notice.message
            )
            if event is not None and in_progress:
                self._lose(event, f"the server says: {notice.message or 'lease lost'}")

    def _lose(self, event: Event, reason: str) -> None:
        self._events.pop(event.lease_id, None)
        if event._lose(reason):
            self._owner._on_slot_freed()

    async def _heartbeat(self) -> None:
        """Extend every lease held unsettled, every third of the lease length."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            held = self._extensions()
            for extend_ms, lease_ids in heartbeat_frames(held).items():
                try:
                    await self._conn.extend(lease_ids, extend_ms)
                except errors.ConnectionLost:
                    return  # the reader sees the broken stream and ends it
                log.debug("leases_extended", count=len(lease_ids), extend_ms=extend_ms)

    def _extensions(self) -> list[tuple[str, int]]:
        auto = self._owner.auto_extend
        return [
            (lease_id, event._extend_ms or self.lease_ms)
            for lease_id, event in self._events.items()
            if event._state is _State.BUFFERED
            or (event._state is _State.HANDED_OUT and (auto or event._extend_ms is not None))
        ]

    # ---- settlements --------------------------------------------------------------------

    def start_settlement(self, event: Event, outcome: models.Outcome) -> asyncio.Task[None]:
        if event._begin_settling():
            self._owner._on_slot_freed()
        task = asyncio.create_task(
            self._settle(event, outcome), name=f"relay-consumer-settle-{event.lease_id}"
        )
        self._settlements.add(task)
        task.add_done_callback(self._settlement_done)
        return task

    async def _settle(self, event: Event, outcome: models.Outcome) -> None:
        # This task has its own copy of the context: binding here leaks nowhere (and
        # costs a tenth of bound_contextvars, which copies the whole context on entry).
        structlog.contextvars.bind_contextvars(
            session_id=self.session_id, **event.delivery.log_context()
        )
        try:
            await self._send(event.lease_id, outcome)
        except errors.ConnectionLost as exc:
            # The server returns the lease to the queue when the stream ends.
            log.warning("settlement_not_sent", outcome=_outcome_name(outcome), error=str(exc))
            event._lose(f"the outcome could not be sent ({exc})")
            raise event._lost_error() from exc
        finally:
            self._events.pop(event.lease_id, None)
        event._state = _State.SETTLED
        _log_outcome(outcome)

    async def _send(self, lease_id: str, outcome: models.Outcome) -> None:
        match outcome:
            case models.Ack(response=models.Response() as response):
                await self._conn.reply(lease_id, response, None)
            case models.Nack(retry_after_ms=retry_after_ms, response=models.Response() as response):
                await self._conn.reply(lease_id, response, retry_after_ms)
            case models.Ack():
                await self._conn.ack([lease_id])
            case models.Nack(retry_after_ms=retry_after_ms, reason=reason):
                await self._conn.nack(lease_id, retry_after_ms, reason)
            case models.Reject(reason=reason):
                await self._conn.reject(lease_id, reason)

    async def extend(self, event: Event, ms: int) -> None:
        event._check_unsettled()
        event._extend_ms = ms
        try:
            await self._conn.extend([event.lease_id], ms)
        except errors.ConnectionLost as exc:
            raise errors.LeaseLost(
                f"the lease of event {event.id} could not be extended: {exc}",
                lease_id=event.lease_id,
            ) from exc

    async def _wait_settlements(self) -> None:
        if self._settlements:
            await asyncio.wait(set(self._settlements), timeout=SETTLE_TIMEOUT_S)

    def _settlement_done(self, task: asyncio.Task[None]) -> None:
        self._settlements.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, errors.LeaseLost):
            log.error("task_failed", task=task.get_name(), exc_info=exc)


def retry_after_ms(seconds: float | None) -> int | None:
    """A NACK's delay in whole milliseconds; None leaves it to the bucket's backoff."""
    if seconds is None:
        return None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"retry_after must be a number of seconds >= 0, not {seconds!r}")
    return round(seconds * 1000)


def extend_ms(seconds: float | None, default_ms: int) -> int:
    """An extension in whole milliseconds (at least 1); None means `default_ms`."""
    if seconds is None:
        return default_ms
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"extend needs a number of seconds > 0, not {seconds!r}")
    return max(1, round(seconds * 1000))


def heartbeat_frames(held: Iterable[tuple[str, int]]) -> dict[int, list[str]]:
    """(lease id, extend_ms) pairs as Extend frames: one per distinct length, usually one."""
    frames: dict[int, list[str]] = {}
    for lease_id, ms in held:
        frames.setdefault(ms, []).append(lease_id)
    return frames


def _log_outcome(outcome: models.Outcome) -> None:
    match outcome:
        case models.Ack():
            if agent_logging.enabled(logging.INFO):
                log.info("delivery_acked")
        case models.Nack(retry_after_ms=retry_after_ms, reason=reason):
            log.info("delivery_nacked", reason=reason, retry_after_ms=retry_after_ms)
        case models.Reject(reason=reason):
            log.warning("delivery_rejected", reason=reason)


def _outcome_name(outcome: models.Outcome) -> str:
    return type(outcome).__name__.lower()


def _raise_failure(runner: asyncio.Task[None]) -> None:
    if runner.done() and not runner.cancelled() and (exc := runner.exception()) is not None:
        raise exc


def _retrieve(task: asyncio.Task[None]) -> None:
    # The failure is raised to whoever iterates; it must not also be reported as unretrieved.
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, errors.FatalError):
        log.error("task_failed", task=task.get_name(), exc_info=exc)  # a bug: say so


async def _cancel_all(tasks: Collection[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_set(work: Awaitable[_T], flag: asyncio.Event) -> _T | None:
    """The result of `work`, or None if `flag` is set first (work is cancelled)."""
    work_task = asyncio.ensure_future(work)
    flag_wait = asyncio.ensure_future(flag.wait())
    try:
        await asyncio.wait({work_task, flag_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel_all([task for task in (work_task, flag_wait) if not task.done()])
    if work_task.cancelled():
        return None
    return work_task.result()
