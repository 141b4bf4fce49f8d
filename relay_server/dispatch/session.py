"""One agent stream: push leases while the agent has credit, apply what it sends back.

The push loop is the only writer to the stream. The reader applies settlements and
extensions and hands "lease lost" notices to the push loop. When the stream ends, every
lease still held is returned to the queue in one write (each counts as an attempt).

A lease whose event has a caller waiting (response mode "wait", `hub.waiting`) asks the
agent for a Reply; the destination's answer it carries goes to the caller as soon as it
is read, before the settlement is written. An Ack for such a lease answers 200. When the
caller is held by another replica (PostgreSQL), `hub.replies` relays the answer to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

import grpc
import structlog

from relay_proto import relay_pb2
from relay_server import errors, models
from relay_server.dispatch import frames, hub
from relay_server.ingress import answers
from relay_server.settings import DispatchSettings
from relay_server.store import sql

log = structlog.get_logger(__name__)


MAX_EXTRA_APPLYING = 64  # frames being applied beyond the credit before reading pauses
APPLY_GRACE_S = 10.0  # how long a closing stream waits for its settlements to be written


class FrameError(errors.RelayError):
    """The agent sent a frame that makes no sense here."""


class AgentSession:
    def __init__(
        self,
        *,
        session_id: str,
        agent: str,
        store: sql.SqlStore,
        hub: hub.Hub,
        outputs: Mapping[str, str],
        credit: int,
        settings: DispatchSettings,
    ) -> None:
        self.session_id = session_id
        self.agent = agent  # "<key_id>/<agent name>": recorded with every attempt
        self.outputs = dict(outputs)  # bucket name -> output id
        self.credit = credit
        self._max_credit = credit  # what Welcome granted: Credit frames may only lower it
        # Lease id -> deadline (ms since the epoch), for credit: a lease that ran out no
        # longer counts against the agent, whether or not it ever settles it.
        self.held: dict[str, int] = {}
        # Lease id -> (lease, is its caller held by another replica?), for waiting callers.
        self._replying: dict[str, tuple[models.Lease, bool]] = {}
        self._store = store
        self._hub = hub
        self._settings = settings
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._notices: list[relay_pb2.ServerMessage] = []
        self._applying: set[asyncio.Task[None]] = set()
        self._pending_acks: list[str] = []
        self._ack_flusher: asyncio.Task[None] | None = None
        self._release_as = models.Outcome.DISCONNECTED

    def _has_credit(self) -> bool:
        return self.credit > len(self.held)

    def stop(self) -> None:
        """The server is shutting down: end the stream and hand the leases straight back."""
        self._release_as = models.Outcome.RELEASED
        self._stopping.set()
        self._wake.set()

    async def run(
        self,
        requests: AsyncIterator[relay_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[relay_pb2.AgentMessage, relay_pb2.ServerMessage],
    ) -> None:
        output_ids = list(self.outputs.values())
        self._hub.register(output_ids, self._wake, self._has_credit)
        reader = asyncio.create_task(self._read(requests), name=f"session-read-{self.session_id}")
        try:
            await self._push(context, reader)
        finally:
            self._hub.unregister(output_ids, self._wake)
            reader.cancel()
            # gather, not await: a reader that failed must not skip the release below.
            await asyncio.gather(reader, return_exceptions=True)
            # Settlements already read are applied before anything is handed back, so an
            # ACK that arrived just before the stream ended still counts.
            await asyncio.shield(self._finish_applying())
            await asyncio.shield(self._release_held())
        failure = None if reader.cancelled() else reader.exception()
        if isinstance(failure, FrameError):
            raise failure

    async def _push(self, context: grpc.aio.ServicerContext, reader: asyncio.Task[None]) -> None:
        woken = True  # the first look, and every wake-up, go straight to a claim
        while not self._stopping.is_set() and not reader.done():
            self._wake.clear()
            while self._notices:
                await context.write(self._notices.pop(0))
            self._forget_expired()
            free = self.credit - len(self.held)
            leases = await self._lease(free, polled=not woken) if free > 0 else []
            woken = False
            if leases:
                self.held.update((lease.lease_id, models.to_ms(lease.deadline)) for lease in leases)
                wanted = self._replies_wanted(leases)
                for frame in frames.batches(leases, self._settings.max_batch_bytes, wanted):
                    await context.write(frame)
                for lease in leases:
                    log.debug("lease_granted", **lease.log_context())
                continue
            woken = await self._sleep(reader)

    async def _lease(self, limit: int, *, polled: bool) -> list[models.Lease]:
        output_ids = list(self.outputs.values())
        # An idle poll: if another session on these outputs just looked, its answer stands.
        if polled and self._hub.recently_idle(output_ids, self._settings.poll_interval_s / 2):
            return []
        try:
            leases = await self._store.lease(
                output_ids,
                limit=limit,
                lease_ms=self._settings.lease_ms,
                holder=self.agent,
                check_first=polled,
            )
        except errors.StorageError as exc:
            log.warning("lease_failed", error=str(exc))
            return []
        if polled and not leases:
            self._hub.found_idle(output_ids)
        return leases

    def _replies_wanted(self, leases: list[models.Lease]) -> set[str]:
        """Event ids among `leases` whose caller waits for the destination's answer."""
        wanted: set[str] = set()
        remote = self._hub.replies
        for lease in leases:
            if self._hub.waiting.wanted(lease.event_id):
                self._replying[lease.lease_id] = (lease, False)
            elif remote is not None and remote.wants(lease):
                self._replying[lease.lease_id] = (lease, True)
            else:
                continue
            wanted.add(lease.event_id)
        return wanted

    def _relay_answer(self, lease_id: str, answer: answers.Answer) -> None:
        lease, elsewhere = self._replying.pop(lease_id, (None, False))
        if lease is None:
            return
        if elsewhere and self._hub.replies is not None:
            self._hub.replies.send(lease, answer)
        elif self._hub.waiting.deliver(lease.event_id, answer):
            log.debug("reply_handed_over", lease_id=lease_id, status=answer.status)

    def _forget_expired(self) -> None:
        now = models.now_ms()
        for lease_id in [k for k, deadline in self.held.items() if deadline < now]:
            del self.held[lease_id]
            self._replying.pop(lease_id, None)

    async def _sleep(self, reader: asyncio.Task[None]) -> bool:
        """Wait for a wake-up (True) or the poll interval (False)."""
        waiter = asyncio.create_task(self._wake.wait(), name=f"session-wake-{self.session_id}")
        try:
            await asyncio.wait(
                {waiter, reader},
                timeout=self._settings.poll_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
        return self._wake.is_set()

    async def _read(self, requests: AsyncIterator[relay_pb2.AgentMessage]) -> None:
        """Apply frames concurrently: settlements in flight together share one commit."""
        async for message in requests:
            kind = message.WhichOneof("kind")
            if kind is None or kind == "subscribe":
                raise FrameError(f"unexpected {kind or 'empty'} frame after Subscribe")
            # At most `credit` settlements can be outstanding; more frames than that in
            # flight means extends piling up: wait for the oldest before reading on.
            while len(self._applying) > self.credit + MAX_EXTRA_APPLYING:
                await asyncio.wait(self._applying, return_when=asyncio.FIRST_COMPLETED)
            if kind == "credit":
                # Applied here, in frame order: no lease is pushed after a Credit{0} that
                # precedes the agent's releasing NACKs.
                self.credit = min(message.credit.max_in_flight, self._max_credit)
                self._wake.set()
            elif kind == "ack":
                for lease_id in message.ack.lease_ids:
                    self._relay_answer(lease_id, answers.ACCEPTED)
                    # The agent's slot is free now: the next claim need not wait for this
                    # ACK's commit, and the two share one group commit.
                    self.held.pop(lease_id, None)
                self._wake.set()
                # ACKs that arrive while a flush is being written go out in the next one.
                self._pending_acks.extend(message.ack.lease_ids)
                if self._ack_flusher is None or self._ack_flusher.done():
                    self._ack_flusher = self._spawn(self._flush_acks())
            else:
                if kind == "reply":
                    self._relay_answer(message.reply.lease_id, frames.answer(message.reply))
                self._spawn(self._apply_and_report(kind, message))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"session-apply-{self.session_id}")
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)
        return task

    async def _flush_acks(self) -> None:
        while self._pending_acks:
            batch, self._pending_acks = self._pending_acks, []
            acks = [models.Settlement(lease_id=i, outcome=models.Outcome.ACK) for i in batch]
            try:
                lost = await self._settle(acks)
            except errors.StorageError as exc:
                log.warning("settle_failed", frame="ack", count=len(batch), error=str(exc))
                continue
            self._report_lost(lost)

    async def _finish_applying(self) -> None:
        if self._applying:
            await asyncio.wait(set(self._applying), timeout=APPLY_GRACE_S)

    async def _apply_and_report(self, kind: str, message: relay_pb2.AgentMessage) -> None:
        try:
            lost = await self._apply(kind, message)
        except errors.StorageError as exc:
            # The lease stays held in storage; the reaper returns it when it runs out.
            log.warning("settle_failed", frame=kind, error=str(exc))
            return
        self._report_lost(lost)

    def _report_lost(self, lost: list[str]) -> None:
        if lost:
            log.info("lease_lost", lease_ids=lost[:10], count=len(lost))
            self._notices.append(
                frames.lease_lost(lost, "lease no longer held (expired or settled)")
            )
            self._wake.set()

    async def _apply(self, kind: str, message: relay_pb2.AgentMessage) -> list[str]:
        if kind == "extend":
            extend_ms = min(max(message.extend.extend_ms, 1000), self._settings.max_extend_ms)
            lease_ids = list(message.extend.lease_ids)
            deadline = models.now_ms() + extend_ms
            lost = await self._store.extend(lease_ids, extend_ms)
            for lease_id in set(lease_ids) - set(lost):
                if lease_id in self.held:
                    self.held[lease_id] = deadline
            return lost
        return await self._settle(frames.settlements(message))

    async def _settle(self, settlements: list[models.Settlement]) -> list[str]:
        lost = await self._store.settle(settlements, agent=self.agent)
        for item in settlements:
            self.held.pop(item.lease_id, None)
            self._replying.pop(item.lease_id, None)
            log.debug("lease_settled", lease_id=item.lease_id, outcome=str(item.outcome))
        self._wake.set()  # credit came back
        return lost

    async def _release_held(self) -> None:
        self._replying.clear()
        if not self.held:
            return
        outcome = self._release_as
        settlements = [
            models.Settlement(
                lease_id=lease_id,
                outcome=outcome,
                retry_after_ms=0 if outcome is models.Outcome.RELEASED else None,
                reason="server shutting down"
                if outcome is models.Outcome.RELEASED
                else "agent stream ended while holding the lease",
            )
            for lease_id in sorted(self.held)
        ]
        try:
            await self._store.settle(settlements, agent=self.agent)
            log.info("leases_released", count=len(settlements), outcome=str(outcome))
        except errors.StorageError as exc:
            log.warning("release_failed", count=len(settlements), error=str(exc))
        self.held.clear()
