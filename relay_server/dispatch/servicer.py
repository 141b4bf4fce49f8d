"""`AgentRelay.Connect`: authenticate, subscribe, then hand the stream to a session.

Domain errors become gRPC status codes here and only here (`STATUS`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
import structlog

from relay_proto import relay_pb2, relay_pb2_grpc
from relay_server import __version__, auth, errors, ids, models, throttle, tls
from relay_server.dispatch import hub, session, streams
from relay_server.settings import DispatchSettings, GrpcSettings
from relay_server.store import sql

log = structlog.get_logger(__name__)

SUBSCRIBE_TIMEOUT_S = 10.0
MAX_BUCKETS = 100


class TooManyConnections(errors.RelayError):
    """The server holds as many agent streams as it is allowed to."""


class ShuttingDown(errors.RelayError):
    """The server is shutting down; reconnect to another replica or retry."""


STATUS: dict[type[Exception], grpc.StatusCode] = {
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.AuthError: grpc.StatusCode.UNAUTHENTICATED,
    session.FrameError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.INVALID_ARGUMENT,
    TooManyConnections: grpc.StatusCode.RESOURCE_EXHAUSTED,
    streams.TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    throttle.TooManyFailures: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.StorageError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: Exception) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


Context: TypeAlias = "grpc.aio.ServicerContext[relay_pb2.AgentMessage, relay_pb2.ServerMessage]"


class AgentRelayServicer(relay_pb2_grpc.AgentRelayServicer):
    def __init__(
        self,
        *,
        store: sql.SqlStore,
        hub: hub.Hub,
        verifier: auth.TokenVerifier,
        grpc_settings: GrpcSettings,
        dispatch: DispatchSettings,
        failures: throttle.FailureThrottle,
    ) -> None:
        self._store = store
        self._failures = failures
        self._hub = hub
        self._verifier = verifier
        self._grpc = grpc_settings
        self._dispatch = dispatch
        self._sessions: set[session.AgentSession] = set()
        self._streams = streams.StreamsPerToken(grpc_settings.max_streams_per_token)
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def connected(self) -> int:
        return len(self._sessions)

    def stop_sessions(self) -> None:
        """Refuse new streams and end the open ones (their leases go straight back)."""
        self._closing = True
        for open_session in list(self._sessions):
            open_session.stop()

    async def wait_closed(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("sessions_still_open", count=len(self._sessions))

    async def Connect(
        self, request_iterator: AsyncIterator[relay_pb2.AgentMessage], context: Context
    ) -> None:
        structlog.contextvars.bind_contextvars(peer=context.peer())
        try:
            await self._serve(request_iterator, context)
        except errors.RelayError as exc:
            code = status_for(exc)
            log.info("agent_refused", code=code.name, reason=exc.message)
            if isinstance(exc, errors.AuthError):  # refused credential or scope: audited
                await self._audit_refused(context, exc)
            await context.abort(code, exc.message)

    async def _serve(
        self, request_iterator: AsyncIterator[relay_pb2.AgentMessage], context: Context
    ) -> None:
        if self._closing:
            raise ShuttingDown()
        if len(self._sessions) >= self._grpc.max_connections:
            raise TooManyConnections()
        token = await self._authenticate(context)
        structlog.contextvars.bind_contextvars(key_id=token.key_id)
        tls.check_binding(token, context.auth_context())  # mTLS: the token's own certificate
        with self._streams.hold(token.key_id):  # RESOURCE_EXHAUSTED past the token's limit
            await self._serve_token(token, request_iterator, context)

    async def _serve_token(
        self,
        token: models.Token,
        request_iterator: AsyncIterator[relay_pb2.AgentMessage],
        context: Context,
    ) -> None:
        # Only now start reading: an unread request stream is left to gRPC untouched.
        requests = aiter(request_iterator)
        subscribe = await self._first_frame(requests)
        outputs = await self._resolve(token, subscribe)
        agent_session = self._open_session(token, subscribe, outputs)
        structlog.contextvars.bind_contextvars(session_id=agent_session.session_id)
        # From here on the session is counted: an agent gone even before its Welcome must
        # still give its slot back.
        try:
            await context.write(
                relay_pb2.ServerMessage(
                    welcome=relay_pb2.Welcome(
                        session_id=agent_session.session_id,
                        server_version=__version__,
                        lease_ms=self._dispatch.lease_ms,
                        buckets=sorted(outputs),
                        max_in_flight=agent_session.credit,
                    )
                )
            )
            await asyncio.shield(self._audit(token, "agent.connect", outputs, context))
            log.info("agent_connected", agent=agent_session.agent, buckets=sorted(outputs))
            await agent_session.run(requests, context)
        finally:
            self._sessions.discard(agent_session)
            if not self._sessions:
                self._idle.set()
            log.info("agent_disconnected", agent=agent_session.agent)
            await asyncio.shield(self._audit(token, "agent.disconnect", outputs, context))

    def _open_session(
        self, token: models.Token, subscribe: relay_pb2.Subscribe, outputs: dict[str, str]
    ) -> session.AgentSession:
        asked = subscribe.max_in_flight or self._grpc.default_in_flight
        name = (subscribe.agent_name or "agent")[:100]
        agent_session = session.AgentSession(
            session_id=ids.new_id(),
            agent=f"{token.key_id}/{name}",
            store=self._store,
            hub=self._hub,
            outputs=outputs,
            credit=min(asked, self._grpc.max_in_flight),
            settings=self._dispatch,
            output=subscribe.output or "default",
        )
        self._sessions.add(agent_session)
        self._idle.clear()
        return agent_session

    async def _authenticate(self, context: Context) -> models.Token:
        address = throttle.grpc_peer_address(context.peer())
        self._failures.check(address)  # too many failures: refused before looking
        scheme, _, presented = _authorization(context).partition(" ")
        if scheme.lower() != "bearer" or not presented:
            self._failures.failed(address)
            raise errors.AuthError("missing token: send metadata 'authorization: Bearer <token>'")
        try:
            token = await self._verifier.verify(presented)
        except errors.AuthError as exc:
            self._failures.failed(address)
            log.warning("token_refused", reason=exc.message)
            raise errors.AuthError("token refused") from exc
        return token

    async def _first_frame(
        self, requests: AsyncIterator[relay_pb2.AgentMessage]
    ) -> relay_pb2.Subscribe:
        try:
            first = await asyncio.wait_for(anext(requests), SUBSCRIBE_TIMEOUT_S)
        except (TimeoutError, StopAsyncIteration) as exc:
            raise session.FrameError("expected a Subscribe frame first") from exc
        if first.WhichOneof("kind") != "subscribe":
            raise session.FrameError("the first frame must be Subscribe")
        subscribe = first.subscribe
        if not subscribe.buckets or len(subscribe.buckets) > MAX_BUCKETS:
            raise session.FrameError(f"Subscribe must name 1 to {MAX_BUCKETS} buckets")
        return subscribe

    async def _resolve(self, token: models.Token, subscribe: relay_pb2.Subscribe) -> dict[str, str]:
        """Bucket name -> output id, refusing any bucket outside the token's scope."""
        in_scope = set((await self._store.bucket_names(token.bucket_ids)).values())
        for name in subscribe.buckets:
            if name not in in_scope:
                # Unknown and out-of-scope buckets look the same to the agent.
                raise errors.PermissionDenied(f"bucket {name!r} is not in this token's scope")
        return await self._store.outputs_for(
            token.account_id, list(dict.fromkeys(subscribe.buckets)), subscribe.output or "default"
        )

    async def _audit(
        self, token: models.Token, action: str, outputs: dict[str, str], context: Context
    ) -> None:
        resource = "buckets:" + ",".join(sorted(outputs))
        await self._record(context, actor=token.key_id, action=action, resource=resource)

    async def _audit_refused(self, context: Context, exc: errors.AuthError) -> None:
        """A refused connect, under the key id presented (never the secret)."""
        key_id = auth.presented_key_id(_authorization(context))
        await self._record(
            context,
            actor=key_id,
            action="agent.connect",
            resource=f"token:{key_id}",
            result="denied",
            detail=exc.message,
        )

    async def _record(self, context: Context, **entry: str) -> None:
        try:
            await self._store.audit(source=context.peer(), **entry)
        except errors.StorageError as exc:
            log.warning("audit_failed", action=entry["action"], error=str(exc))


def _authorization(context: Context) -> str:
    """The `authorization` metadata of the call ('' if none)."""
    metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
    return str(metadata.get("authorization", ""))
