"""One gRPC stream to the server: `AgentRelay.Connect`, from Subscribe to close.

A Connection owns its channel and its call. Frames to the server go through an outbox
that grpc pulls from (the call's request iterator); each send returns once its frame has
been written to the transport, or raises ConnectionLost. Acks queued in the same loop
tick travel as one Ack frame. gRPC status codes become agent errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import pathlib
from collections.abc import Sequence
from typing import TypeAlias

import grpc
import grpc.aio
import structlog

import relay_agent
from relay_agent import errors, models, settings
from relay_proto import relay_pb2, relay_pb2_grpc

log = structlog.get_logger(__name__)

MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024 * 1024
# A server that accepts the stream but never says Welcome is as good as unreachable.
WELCOME_TIMEOUT_S = 30.0
# On close, how long to wait for the server to end the stream after we half-close it.
CLOSE_TIMEOUT_S = 5.0
_MAX_FRAMES_PER_BATCH = 1000
_MAX_REASON_CHARS = 1000
_UINT32_MAX = 2**32 - 1
# GRPC_ARG_PING_TIMEOUT_MS, from grpc-core's chttp2 transport (not in the public headers).
PING_TIMEOUT_OPTION = "grpc.http2.ping_timeout_ms"

Incoming: TypeAlias = models.Delivery | models.LeaseLost


class Connection:
    """One Connect stream. Open once, then receive and send; close always."""

    def __init__(self, agent_settings: settings.AgentSettings, server: str | None = None) -> None:
        self._settings = agent_settings
        self.server = server or agent_settings.servers[0]  # which replica this stream dials
        self._outbox = _Outbox()
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._closed = False

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def open(self) -> models.Welcome:
        """Start the stream, send Subscribe, and wait for the server's Welcome."""
        if self._channel is not None or self._closed:
            raise RuntimeError("a Connection can only be opened once")
        self._channel = make_channel(self._settings, self.server)
        self._outbox.put(subscribe_message(self._settings))
        stub = relay_pb2_grpc.AgentRelayStub(self._channel)  # type: ignore[no-untyped-call]
        metadata = (("authorization", f"Bearer {self._settings.token}"),)
        self._call = stub.Connect(self._outbox, metadata=metadata)
        try:
            message = await asyncio.wait_for(self._read(), WELCOME_TIMEOUT_S)
        except TimeoutError:
            raise errors.ConnectionLost(
                f"the server sent no Welcome within {WELCOME_TIMEOUT_S:g}s"
            ) from None
        kind = message.WhichOneof("kind")
        if kind != "welcome":
            raise errors.ConnectionLost(f"the server sent {kind!r} before Welcome")
        return models.Welcome.from_proto(message.welcome)

    async def receive(self) -> list[Incoming]:
        """What the next server frame carries (possibly nothing); raises when the stream ends."""
        message = await self._read()
        kind = message.WhichOneof("kind")
        if kind == "deliveries":
            return [models.Delivery.from_proto(item) for item in message.deliveries.deliveries]
        if kind == "notice" and message.notice.code == relay_pb2.LeaseNotice.LEASE_LOST:
            return [models.LeaseLost.from_proto(message.notice)]
        log.warning("unexpected_frame", kind=kind)
        return []

    async def ack(self, lease_ids: Sequence[str]) -> None:
        await self._outbox.put(None, acks=lease_ids)

    async def nack(self, lease_id: str, retry_after_ms: int | None, reason: str) -> None:
        nack = relay_pb2.Nack(
            lease_id=lease_id,
            retry_after_ms=wire_retry_after_ms(retry_after_ms),
            reason=reason[:_MAX_REASON_CHARS],
        )
        await self._outbox.put(relay_pb2.AgentMessage(nack=nack))

    async def extend(self, lease_ids: Sequence[str], extend_ms: int) -> None:
        extend = relay_pb2.Extend(lease_ids=lease_ids, extend_ms=min(extend_ms, _UINT32_MAX))
        await self._outbox.put(relay_pb2.AgentMessage(extend=extend))

    async def credit(self, max_in_flight: int) -> None:
        """Let the server push at most this many unsettled deliveries; 0 pauses the stream."""
        credit = relay_pb2.Credit(max_in_flight=max(0, min(max_in_flight, _UINT32_MAX)))
        await self._outbox.put(relay_pb2.AgentMessage(credit=credit))

    async def reply(
        self, lease_id: str, response: models.Response, retry_after_ms: int | None
    ) -> None:
        """Settle with the destination's answer (2xx: like Ack, else like Nack)."""
        reply = relay_pb2.Reply(
            lease_id=lease_id,
            status=response.status,
            headers=[relay_pb2.Header(name=k, value=v) for k, v in response.headers],
            body=response.body,
            retry_after_ms=wire_retry_after_ms(retry_after_ms),
            body_too_large=response.body_too_large,
        )
        await self._outbox.put(relay_pb2.AgentMessage(reply=reply))

    async def reject(self, lease_id: str, reason: str) -> None:
        reject = relay_pb2.Reject(lease_id=lease_id, reason=reason[:_MAX_REASON_CHARS])
        await self._outbox.put(relay_pb2.AgentMessage(reject=reject))

    async def close(self) -> None:
        """Flush what is queued, half-close, let the server end the stream, close the channel."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._call is not None and not self._call.done():
                await self._finish(self._call)
        finally:
            if self._call is not None:
                self._call.cancel()
            self._outbox.fail("the connection is closed")
            if self._channel is not None:
                await self._channel.close()

    async def _finish(self, call: grpc.aio.StreamStreamCall) -> None:
        self._outbox.end()
        try:
            # The server answers our half-close by ending the stream; frames queued
            # before it are written first, so settlements are not cut off by a reset.
            await asyncio.wait_for(call.code(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.info("close_timed_out", timeout_s=CLOSE_TIMEOUT_S)

    async def _read(self) -> relay_pb2.ServerMessage:
        if self._call is None:
            raise RuntimeError("the Connection is not open")
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            error = error_from_status(exc.code(), exc.details() or "", self._settings)
            self._outbox.fail(str(error))
            raise error from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our reader was cancelled: let it go
            # grpc raises CancelledError in the reader when the call was cancelled locally.
            self._outbox.fail("the connection is closed")
            raise errors.ConnectionLost("the connection was closed") from None
        if message is grpc.aio.EOF:
            self._outbox.fail("the server ended the stream")
            raise errors.ConnectionLost("the server ended the stream")
        result: relay_pb2.ServerMessage = message
        return result


def make_channel(agent_settings: settings.AgentSettings, server: str) -> grpc.aio.Channel:
    """TLS unless told otherwise, with keepalive so a dead peer is noticed."""
    options: list[tuple[str, str | int]] = [
        ("grpc.keepalive_time_ms", agent_settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", agent_settings.keepalive_timeout_ms),
        # grpc-core waits for a ping's ACK up to this (default: 1 minute) whatever the
        # keepalive timeout says: without it a dead path is noticed a minute late.
        (PING_TIMEOUT_OPTION, agent_settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.primary_user_agent", f"stowhook-agent/{relay_agent.__version__}"),
    ]
    if agent_settings.insecure:
        return grpc.aio.insecure_channel(server, options=options)
    if agent_settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", agent_settings.tls_server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(agent_settings.ca_file, "CA file"),
        private_key=_read(agent_settings.client_key, "client key"),
        certificate_chain=_read(agent_settings.client_cert, "client certificate"),
    )
    return grpc.aio.secure_channel(server, credentials, options=options)


def subscribe_message(agent_settings: settings.AgentSettings) -> relay_pb2.AgentMessage:
    subscribe = relay_pb2.Subscribe(
        buckets=agent_settings.buckets,
        output=agent_settings.output,
        max_in_flight=agent_settings.max_in_flight,
        agent_name=agent_settings.agent_name,
        version=relay_agent.__version__,
    )
    return relay_pb2.AgentMessage(subscribe=subscribe)


def error_from_status(
    code: grpc.StatusCode, details: str, agent_settings: settings.AgentSettings
) -> errors.AgentError:
    """The one table from gRPC status codes to agent errors."""
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return errors.TokenRefused(
            f"the server refused the token (key id {agent_settings.key_id}): {details}",
            key_id=agent_settings.key_id,
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return errors.BucketRefused(
            details or "the server refused a subscribed bucket",
            bucket=named_bucket(details, agent_settings.buckets),
        )
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return errors.FatalError(f"the server rejected a frame from this agent: {details}")
    return errors.ConnectionLost(f"{code.name}: {details}" if details else code.name)


def named_bucket(details: str, buckets: Sequence[str]) -> str | None:
    """Which subscribed bucket the server's message is about, if it can be told."""
    for bucket in buckets:
        if f"'{bucket}'" in details or f'"{bucket}"' in details:
            return bucket
    if len(buckets) == 1:
        return buckets[0]
    named = [bucket for bucket in buckets if bucket in details]
    return max(named, key=len) if named else None


def wire_retry_after_ms(retry_after_ms: int | None) -> int:
    # On the wire 0 means "use the bucket's backoff"; a wish to retry at once is 1 ms.
    if retry_after_ms is None:
        return 0
    return min(max(retry_after_ms, 1), _UINT32_MAX)


def _read(path: pathlib.Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise errors.ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@dataclasses.dataclass(slots=True)
class _Pending:
    # None (and no acks) marks the end of the stream (half-close)
    message: relay_pb2.AgentMessage | None
    written: asyncio.Future[None]
    # Lease ids to ACK: kept as ids, every ACK of a batch goes into one frame (coalesce).
    acks: Sequence[str] | None = None


Frame: TypeAlias = tuple[relay_pb2.AgentMessage | None, list[asyncio.Future[None]]]


class _Outbox:
    """The call's request iterator: frames wait here until grpc pulls and writes them.

    grpc asks for the next frame only after writing the previous one, so that is when
    the previous frame's senders are told it has been written.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._ready: collections.deque[Frame] = collections.deque()
        self._in_transit: list[asyncio.Future[None]] = []
        self._failure: str | None = None
        self._ended = False

    def put(
        self, message: relay_pb2.AgentMessage | None, *, acks: Sequence[str] | None = None
    ) -> asyncio.Future[None]:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        written.add_done_callback(_retrieve_exception)
        if self._failure is not None:
            written.set_exception(errors.ConnectionLost(self._failure))
        elif self._ended:
            written.set_exception(errors.ConnectionLost("the connection is closing"))
        else:
            self._queue.put_nowait(_Pending(message, written, acks))
        return written

    def end(self) -> None:
        """Write what is queued, then half-close the stream."""
        if not self._ended:
            self.put(None)
            self._ended = True

    def fail(self, reason: str) -> None:
        """Nothing more will be written: every waiting sender gets ConnectionLost."""
        self._failure = self._failure or reason
        waiting = [*self._in_transit, *(f for _, futures in self._ready for f in futures)]
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait().written)
        self._in_transit, self._ready = [], collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(errors.ConnectionLost(self._failure))
        # Wake a consumer blocked on the empty queue so that grpc's writer task ends.
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        wake.set_result(None)
        self._queue.put_nowait(_Pending(None, wake))

    def __aiter__(self) -> _Outbox:
        return self

    async def __anext__(self) -> relay_pb2.AgentMessage:
        _resolve(self._in_transit)
        self._in_transit = []
        if not self._ready:
            self._ready.extend(coalesce(await self._next_batch()))
        message, futures = self._ready.popleft()
        if message is None:
            _resolve(futures)
            raise StopAsyncIteration
        self._in_transit = futures
        return message

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        while len(batch) < _MAX_FRAMES_PER_BATCH and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch


def coalesce(batch: Sequence[_Pending]) -> list[Frame]:
    """Frames in queue order, except that all acks travel together after the rest.

    Moving an ack later is always safe; moving it earlier could put it before an
    Extend of the same lease.
    """
    frames: list[Frame] = []
    ack_ids: list[str] = []
    ack_futures: list[asyncio.Future[None]] = []
    end: list[Frame] = []
    for pending in batch:
        if pending.acks is not None:
            ack_ids.extend(pending.acks)
            ack_futures.append(pending.written)
        elif pending.message is None:
            end.append((None, [pending.written]))
        else:
            frames.append((pending.message, [pending.written]))
    if ack_futures:
        frames.append((relay_pb2.AgentMessage(ack=relay_pb2.Ack(lease_ids=ack_ids)), ack_futures))
    return frames + end


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _retrieve_exception(future: asyncio.Future[None]) -> None:
    # A sender that gave up waiting must not leave "exception was never retrieved" behind.
    if not future.cancelled():
        future.exception()
