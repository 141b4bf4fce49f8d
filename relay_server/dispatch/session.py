"""One agent stream: push leases while the agent has credit, apply what it sends back.

The push loop is the only writer to the stream. The reader applies settlements and
extensions and hands "lease lost" notices to the push loop. When the stream ends, every
lease still held is returned to the queue in one write (each counts as an attempt).

A lease whose event has a caller waiting (response mode "wait", `hub.waiting`) asks the
agent for a Reply; the destination's answer it carries goes to the caller as soon as it
is read, before the settlement is written. An Ack for such a lease answers 200. When the
caller is held by another replica (PostgreSQL), `hub.replies` relays the answer to it.

A session that is caught up (its last claim found no backlog) offers the free places in
its window to ingest (`offer`, through the hub): a new event's delivery is then written
LEASED to this agent in the event's own transaction and given here after the commit, so
the live path costs no claim transaction and no re-read of the sealed event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
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
# Settled lease ids a session remembers (newest kept): far more than any window of frames.
SETTLED_REMEMBERED = 4096


class FrameError(errors.RelayError):
    """The agent sent a frame that makes no sense here."""


class Wake(asyncio.Event):
    """The push loop's wake-up. The hub `set`s it for news (new deliveries to claim, kept
    until a claim runs); the session `poke`s it for its own reasons (credit came back, a
    lease was given, a notice to send), which need no claim from a caught-up session."""

    def __init__(self) -> None:
        super().__init__()
        self.news = False

    def set(self) -> None:
        self.news = True
        super().set()

    def poke(self) -> None:
        super().set()


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
        output: str = "default",
    ) -> None:
        self.session_id = session_id
        self.agent = agent  # "<key_id>/<agent name>": recorded with every attempt
        self.outputs = dict(outputs)  # bucket name -> output id
        self.output = output  # the output's name (the same in every bucket)
        self._bucket_of = {output_id: bucket for bucket, output_id in self.outputs.items()}
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
        self._wake = Wake()
        self._stopping = asyncio.Event()
        self._notices: list[relay_pb2.ServerMessage] = []
        self._applying: set[asyncio.Task[None]] = set()
        self._pending_acks: list[str] = []
        # Lease ids this agent settled, newest last (bounded): an Extend applied after the
        # agent's own ACK of the same lease finds it settled, which is no news to report.
        self._settled_here: dict[str, None] = {}
        self._ack_flusher: asyncio.Task[None] | None = None
        self._release_as = models.Outcome.DISCONNECTED
        self._reserved = 0  # places held for events being committed (offer)
        self._handed: list[models.Lease] = []  # given at ingest, not yet pushed
        self._caught_up = False  # the last claim found fewer deliveries than it asked for
        self._ordered = False  # some of the outputs are ordered (as the last claim saw)
        self._closed = False  # unregistered: leases given from now on are handed back

    @property
    def _batch(self) -> int:
        """Free places worth a claim while a backlog waits."""
        return max(1, self.credit // 4)

    def _has_credit(self) -> bool:
        return self.credit > len(self.held) + self._reserved

    def offer(self, output_id: str) -> models.Slot | None:
        """Hold a place in the agent's window for one new event (see the module doc)."""
        if self._closed or self._stopping.is_set() or not self._caught_up:
            return None
        if not self._has_credit():
            return None
        self._reserved += 1
        return models.Slot(
            holder=self.agent,
            lease_ms=self._settings.lease_ms,
            bucket=self._bucket_of[output_id],
            output=self.output,
            give=self._given,
            cancel=self._unreserve,
        )

    def _given(self, lease: models.Lease) -> None:
        self._reserved -= 1
        # While the event was being committed, the stream ended or the agent lowered its
        # credit (a Credit frame promises no lease is pushed after it): hand it back.
        if self._closed or self._stopping.is_set() or len(self.held) >= self.credit:
            _in_background(self._hand_back(lease), f"session-hand-back-{self.session_id}")
            return
        self.held[lease.lease_id] = models.to_ms(lease.deadline)
        self._handed.append(lease)
        self._wake.poke()

    def _unreserve(self) -> None:
        self._reserved -= 1
        self._wake.set()  # the event may wait PENDING (an ordered output): claim it

    async def _hand_back(self, lease: models.Lease) -> None:
        release = models.Settlement(
            lease_id=lease.lease_id,
            outcome=models.Outcome.RELEASED,
            retry_after_ms=0,
            reason="handed back: the agent's stream ended or its credit fell",
        )
        await self._give_back([release])

    def stop(self) -> None:
        """The server is shutting down: end the stream and hand the leases straight back."""
        self._release_as = models.Outcome.RELEASED
        self._stopping.set()
        self._wake.poke()

    async def run(
        self,
        requests: AsyncIterator[relay_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[relay_pb2.AgentMessage, relay_pb2.ServerMessage],
    ) -> None:
        output_ids = list(self.outputs.values())
        self._hub.register(output_ids, self._wake, self._has_credit, self.offer)
        reader = asyncio.create_task(self._read(requests), name=f"session-read-{self.session_id}")
        try:
            await self._push(context, reader)
        finally:
            self._hub.unregister(output_ids, self._wake)
            self._closed = True
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
        woken = True  # the first look goes straight to a claim
        self._wake.news = True
        while not self._stopping.is_set() and not reader.done():
            self._wake.clear()
            while self._notices:
                await context.write(self._notices.pop(0))
            self._forget_expired()
            handed, self._handed = self._handed, []  # held already
            if handed:
                await self._send(context, handed)
                woken = await self._sleep(reader)  # at once if more came meanwhile
                continue
            free = self.credit - len(self.held) - self._reserved
            leases: list[models.Lease] = []
            # Woken only by credit coming back, a caught-up session has nothing to claim:
            # new events come with news (or are given to it). The poll still looks.
            # Behind a backlog, ACKs trickle in one or two at a time: claiming for each
            # would make many tiny claim transactions. Claim once a quarter of the
            # window is free (or nothing is in flight, or the poll comes round).
            gathering = woken and not self._caught_up and self.held and free < self._batch
            if free > 0 and not gathering and (self._wake.news or not woken or not self._caught_up):
                polled = not woken and not self._wake.news
                self._wake.news = False
                leases = await self._lease(free, polled=polled)
            if leases:
                self.held.update((lease.lease_id, models.to_ms(lease.deadline)) for lease in leases)
                await self._send(context, leases)
                # Not a poll: what freed up meanwhile is claimed without a look first.
                woken = True
                continue
            woken = await self._sleep(reader)

    async def _send(self, context: grpc.aio.ServicerContext, leases: list[models.Lease]) -> None:
        wanted = self._replies_wanted(leases)
        for frame in frames.batches(leases, self._settings.max_batch_bytes, wanted):
            await context.write(frame)
        for lease in leases:
            log.debug("lease_granted", **lease.log_context())

    async def _lease(self, limit: int, *, polled: bool) -> list[models.Lease]:
        output_ids = list(self.outputs.values())
        # An idle poll: if another session on these outputs just looked, its answer stands.
        if polled and self._hub.recently_idle(output_ids, self._settings.poll_interval_s / 2):
            self._caught_up = not self._ordered
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
            self._caught_up = False
            return []
        if leases.ordered is not None:
            self._ordered = leases.ordered
        # An ordered output gives one delivery at a time: never caught up, it needs a
        # claim after each settlement to give the next.
        self._caught_up = len(leases) < limit and not self._ordered
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
                self._wake.poke()
            elif kind == "ack":
                for lease_id in message.ack.lease_ids:
                    self._relay_answer(lease_id, answers.ACCEPTED)
                    # The agent's slot is free now: the next claim need not wait for this
                    # ACK's commit, and the two share one group commit.
                    self.held.pop(lease_id, None)
                self._wake.poke()
                # ACKs that arrive while a flush is being written go out in the next one.
                self._pending_acks.extend(message.ack.lease_ids)
                if self._ack_flusher is None or self._ack_flusher.done():
                    self._ack_flusher = self._spawn(self._flush_acks())
            else:
                if kind == "reply":
                    self._relay_answer(message.reply.lease_id, frames.answer(message.reply))
                self._spawn(self._apply_and_report(kind, message))

    def _note_settled(self, lease_ids: Iterable[str]) -> None:
        for lease_id in lease_ids:
            self._settled_here[lease_id] = None
        while len(self._settled_here) > SETTLED_REMEMBERED:
            del self._settled_here[next(iter(self._settled_here))]

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
            self._wake.poke()

    async def _apply(self, kind: str, message: relay_pb2.AgentMessage) -> list[str]:
        if kind == "extend":
            extend_ms = min(max(message.extend.extend_ms, 1000), self._settings.max_extend_ms)
            lease_ids = list(message.extend.lease_ids)
            deadline = models.now_ms() + extend_ms
            lost = await self._store.extend(lease_ids, extend_ms)
            for lease_id in set(lease_ids) - set(lost):
                if lease_id in self.held:
                    self.held[lease_id] = deadline
            # Frames apply concurrently: an ACK right behind this Extend may commit first.
            return [lease_id for lease_id in lost if lease_id not in self._settled_here]
        return await self._settle(frames.settlements(message))

    async def _settle(self, settlements: list[models.Settlement]) -> list[str]:
        self._note_settled(item.lease_id for item in settlements)  # before its commit
        lost = await self._store.settle(settlements, agent=self.agent)
        for item in settlements:
            self.held.pop(item.lease_id, None)
            self._replying.pop(item.lease_id, None)
            log.debug("lease_settled", lease_id=item.lease_id, outcome=str(item.outcome))
        if all(item.outcome is models.Outcome.ACK for item in settlements):
            self._wake.poke()  # credit came back
        else:
            self._wake.set()  # and a delivery may be due again at once (retry after 0)
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
        await self._give_back(settlements)
        self.held.clear()

    async def _give_back(self, settlements: list[models.Settlement]) -> None:
        """Return leases to the queue and tell another session; if the database fails, the
        reaper returns them when they run out."""
        try:
            await self._store.settle(settlements, agent=self.agent)
        except errors.StorageError as exc:
            log.warning("release_failed", count=len(settlements), error=str(exc))
            return
        log.info("leases_released", count=len(settlements), outcome=str(settlements[0].outcome))
        self._hub.notify(self.outputs.values())  # another agent may take them now


_BACKGROUND: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[Any, Any, None], name: str) -> None:
    """Run `work` after its session has ended (kept referenced until it is done)."""
    task = asyncio.create_task(work, name=name)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
