"""`SqlStore`: the storage seam implemented once on SQLAlchemy Core (SQLite and PostgreSQL).

Nothing above this module sees SQL. Sealing and opening payloads happens here, outside
the write transaction where possible, so the single SQLite writer only does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from relay_server import crypto, errors, models, retry
from relay_server.store import (
    admin,
    audit_log,
    bodyfiles,
    codecs,
    database,
    ephemeral,
    events,
    outputs,
    queue,
    queue_sqlite,
    retention,
    wait_replies,
)

log = structlog.get_logger(__name__)

BODY_FILE_LOST = "the body file of this event is missing from <database>.bodies"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStatus:
    database_url: str  # password redacted
    schema_revision: str | None
    deliveries: dict[str, int]  # by state, across the account
    oldest_pending_ms: int | None  # received_at of the oldest event still pending
    database_files: dict[str, int]  # SQLite: path -> bytes (main file, -wal, -shm)


class SqlStore:
    def __init__(
        self,
        settings: database.DatabaseSettings,
        keyring: crypto.KeyRing | None,
        *,
        retry_base: retry.RetryPolicy | None = None,
        payloads: ephemeral.PayloadMemory | None = None,
    ) -> None:
        self.db = database.Database(settings)
        self._keyring = keyring
        self.retry_base = retry_base or retry.RetryPolicy()
        # Ephemeral buckets' payloads: in this process only, never in the database.
        self.payloads = payloads if payloads is not None else ephemeral.PayloadMemory()

    @property
    def keyring(self) -> crypto.KeyRing:
        if self._keyring is None:
            raise errors.ConfigError("this operation needs the AES key (--key-file)")
        return self._keyring

    def use_keyring(self, keyring: crypto.KeyRing) -> None:
        """Seal and open with `keyring` from now on (a rotated key file was re-read)."""
        self._keyring = keyring

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def migrate(self) -> None:
        await self.db.migrate()

    async def probe_write(self) -> None:
        """Take and commit a write transaction now; StorageError if the database refuses."""
        await self.db.probe_write()

    # ---- the delivery path -------------------------------------------------------

    async def ingest(
        self, event: models.IncomingEvent, offer: models.Offer | None = None
    ) -> str | None:
        """Store the event sealed, with one delivery per output; returns after commit.

        Each delivery is PENDING, or with `offer` (the hub's), LEASED straight to an agent
        that had a free place for it, and given to that agent after the commit.
        Returns None, or the id of the earlier event this one duplicates (nothing stored).
        errors.Replay if the event's signature nonce was seen before (nothing stored).
        """
        policy = event.route.bucket.policy
        # One ring for the whole event: a key file reloaded while a body file is written
        # must not leave the file under a key the row no longer shows in use.
        keyring = self.keyring
        body_file = (
            not policy.ephemeral
            and self.db.bodies is not None
            and len(event.body) >= bodyfiles.FROM_BYTES
        )
        if body_file:  # before any agent's place is taken: this may fail, or take a while
            await self._write_body_file(keyring, event)
        slots: dict[str, models.Slot] = {}
        if offer is not None and not policy.ephemeral:
            for output_id in event.route.output_ids:
                slot = offer(output_id)
                if slot is not None:
                    slots[output_id] = slot
        new = queue.NewEvent(
            row=ephemeral.held_row(keyring, self.payloads, event)
            if policy.ephemeral
            else queue.seal_event(keyring, event, body_file=body_file),
            bucket_id=event.route.bucket.id,
            dedup_key=models.dedup_key(policy.dedup_headers, event.headers),
            dedup_window_ms=policy.dedup_window_ms,
            nonce=event.nonce,
            slots={output_id: (s.holder, s.lease_ms) for output_id, s in slots.items()},
        )
        stored = False
        try:
            result: queue.Ingested = await self.db.write_coalesced(
                "ingest", queue.insert_events, new, sqlite_many=queue_sqlite.insert_events
            )
            stored = result.stored
            for output_id, delivery_id, deadline_ms in result.leased:
                slot = slots.pop(output_id)
                slot.give(_handed(event, slot, delivery_id, deadline_ms))
        finally:
            for slot in slots.values():  # not used: a duplicate, an ordered output, a failure
                slot.cancel()
            if policy.ephemeral and not stored:
                self.payloads.drop([event.id])
        if body_file and not stored:  # a duplicate or a replay: no row names the file
            self.bodies.discard([event.id])
        if result.replay:
            raise errors.Replay()
        return result.duplicate_of

    @property
    def bodies(self) -> bodyfiles.BodyFiles:
        assert self.db.bodies is not None, "body files are for SQLite databases in a file"
        return self.db.bodies

    async def _write_body_file(self, keyring: crypto.KeyRing, event: models.IncomingEvent) -> None:
        """Seal the body into its file, durably, off the loop (errors.StorageUnavailable
        if the disk refuses: the sender is answered 503 and sends again)."""
        aad = queue.aad(event.id, "body")

        def write() -> None:
            self.bodies.write(event.id, keyring.seal_chunks(event.body, aad))

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            raise errors.StorageUnavailable(f"could not write the body file: {exc}") from exc

    async def lease(
        self,
        output_ids: Sequence[str],
        *,
        limit: int,
        lease_ms: int,
        holder: str,
        check_first: bool = False,
    ) -> queue.Claimed[models.Lease]:
        """Lease up to `limit` deliveries, oldest first. With `check_first`, look with a
        read before taking the write path (for idle polling)."""
        if check_first:
            async with self.db.read() as conn:
                if not await queue.has_available(conn, output_ids):
                    return queue.Claimed()
        raw = await self.db.write(
            functools.partial(
                queue.claim, output_ids=output_ids, limit=limit, lease_ms=lease_ms, holder=holder
            ),
            sqlite=functools.partial(
                queue_sqlite.claim,
                output_ids=output_ids,
                limit=limit,
                lease_ms=lease_ms,
                holder=holder,
            ),
            durable=False,  # a lease lost to power loss is a delivery made again
        )
        files = await self._read_body_files(raw)
        opened = [(item, self._open_lease(item, files)) for item in raw]
        lost: dict[str, list[tuple[str, int]]] = {}  # reason -> (delivery id, attempt)
        for item, lease in opened:
            if lease is None:  # a body file (never ephemeral) is missing, or a payload is
                reason = BODY_FILE_LOST if item.event.body_file else ephemeral.LOST_ERROR
                lost.setdefault(reason, []).append((item.delivery_id, item.attempt))
        for reason, pairs in lost.items():
            await self.db.write(
                functools.partial(ephemeral.payloads_lost, leases=pairs, reason=reason)
            )
        leases = queue.Claimed(lease for _, lease in opened if lease is not None)
        leases.ordered = raw.ordered
        return leases

    async def _read_body_files(self, raw: Sequence[queue.RawLease]) -> dict[str, bytes | None]:
        """Event id -> the sealed body in its file (None: missing), for these leases'
        events whose body is a file; read off the loop."""
        wanted = {item.event.id for item in raw if item.event.body_file}
        if not wanted:
            return {}
        found = await asyncio.to_thread(self.bodies.read_many, wanted)
        for event_id in sorted(event_id for event_id, body in found.items() if body is None):
            log.error("body_file_missing", event_id=event_id, path=str(self.bodies.path(event_id)))
        return found

    def _open_lease(
        self, item: queue.RawLease, files: dict[str, bytes | None]
    ) -> models.Lease | None:
        """The lease with its payload opened; None for an ephemeral one no longer held, or
        one whose body file is missing."""
        event = item.event
        if event.ephemeral:
            payload = self.payloads.take(event.id, item.delivery_id)
            if payload is None:
                return None
            path, query, headers, body = payload.path, payload.query, payload.headers, payload.body
        else:
            path = event.path
            sealed_body = event.body_sealed
            if event.body_file:
                sealed_body = files.get(event.id)
                if sealed_body is None:
                    return None
            query, headers, body = queue.open_payload(
                self.keyring, event.id, event.query_sealed, event.headers_sealed, sealed_body
            )
        return models.Lease(
            lease_id=models.format_lease_id(item.delivery_id, item.attempt),
            delivery_id=item.delivery_id,
            attempt=item.attempt,
            deadline=models.from_ms(item.deadline_ms),
            event_id=event.id,
            bucket=item.bucket,
            output=item.output,
            input_id=event.input_id,
            method=event.method,
            path=path,
            query=query,
            headers=headers,
            body=body,
            received_at=models.from_ms(event.received_at),
            replay=item.replay,
            caller_waits_until=event.caller_waits_until,
        )

    async def settle(self, settlements: Sequence[models.Settlement], *, agent: str) -> list[str]:
        """Apply ACK/NACK/REJECT/failures; returns lease ids no longer held (fenced off)."""
        only_acks = all(item.outcome is models.Outcome.ACK for item in settlements)
        lost: list[str] = await self.db.write(
            functools.partial(
                queue.settle, settlements=settlements, agent=agent, base_policy=self.retry_base
            ),
            sqlite=functools.partial(queue_sqlite.settle_acks, settlements=settlements, agent=agent)
            if only_acks
            else None,
            durable=not only_acks,  # an ACK lost to power loss is a delivery made again
        )
        await ephemeral.forget_settled(self.db, self.payloads, [s.lease_id for s in settlements])
        return lost

    async def put_wait_reply(self, event_id: str, plain: bytes, *, expires_at: int) -> None:
        """Leave an answer for a caller held by another replica (store/wait_replies.py)."""
        await self.db.write(
            functools.partial(
                wait_replies.put,
                keyring=self.keyring,
                event_id=event_id,
                plain=plain,
                expires_at=expires_at,
            )
        )

    async def take_wait_replies(self, event_ids: Sequence[str]) -> dict[str, bytes]:
        """The answers other replicas left for these events, removed as they are taken.

        Looks with a read first: callers usually wait with no answer left yet."""
        async with self.db.read() as conn:
            event_ids = await wait_replies.present(conn, event_ids)
        if not event_ids:
            return {}
        return dict(
            await self.db.write(
                functools.partial(wait_replies.take, keyring=self.keyring, event_ids=event_ids)
            )
        )

    async def extend(self, lease_ids: Sequence[str], extend_ms: int) -> list[str]:
        return await self.db.write(
            functools.partial(queue.extend, lease_ids=lease_ids, extend_ms=extend_ms)
        )

    async def reap(self, *, limit: int = 500) -> list[str]:
        """Expire leases past their deadline (each a failed attempt); returns their ids."""
        expired: list[str] = await self.db.write(
            functools.partial(queue.reap, limit=limit, base_policy=self.retry_base)
        )
        await ephemeral.forget_settled(self.db, self.payloads, expired)
        return expired

    async def route(self, input_id: str) -> models.Route | None:
        """The input's route; its signing secrets opened (they exist only in memory)."""
        async with self.db.read() as conn:
            found = await admin.route(conn, input_id)
        if found is None:
            return None
        route, sealed = found
        verification = route.input.verification
        if verification is None or sealed is None:
            return route
        secrets = codecs.open_secrets(self.keyring, route.input.id, sealed)
        opened = dataclasses.replace(verification, secrets=secrets)
        return dataclasses.replace(
            route, input=dataclasses.replace(route.input, verification=opened)
        )

    async def get_input(self, account_id: str, input_id: str) -> models.Input:
        async with self.db.read() as conn:
            return await admin.get_input(conn, account_id, input_id)

    async def set_input_auth(
        self, bucket: models.Bucket, auth: models.InputAuth | None
    ) -> models.Bucket:
        return await self.db.write(
            functools.partial(admin.set_input_auth, bucket=bucket, auth=auth)
        )

    async def set_verification(
        self, input_id: str, verification: models.Verification | None
    ) -> None:
        """Store how the input verifies signatures; its secrets sealed, never in clear."""
        sealed = (
            None
            if verification is None
            else codecs.seal_secrets(self.keyring, input_id, verification.secrets)
        )
        await self.db.write(
            functools.partial(
                admin.update_input,
                input_id=input_id,
                verify=codecs.dump_verification(verification),
                verify_secrets_sealed=sealed,
            )
        )

    async def set_response(self, input_id: str, mode: models.ResponseMode) -> None:
        await self.db.write(
            functools.partial(
                admin.update_input, input_id=input_id, response=codecs.dump_response(mode)
            )
        )

    async def set_rate_limit(self, input_id: str, limit: models.RateLimit | None) -> None:
        await self.db.write(
            functools.partial(
                admin.update_input,
                input_id=input_id,
                rate_per_s=None if limit is None else limit.per_s,
                rate_burst=None if limit is None else limit.burst,
            )
        )

    # ---- credentials ---------------------------------------------------------------

    async def token(self, key_id: str) -> tuple[models.Token, tuple[str, ...]] | None:
        """The token and the bcrypt hashes of the secrets valid for it right now."""
        async with self.db.read() as conn:
            return await admin.get_token(conn, key_id)

    async def touch_token(self, key_id: str) -> None:
        await self.db.write(functools.partial(admin.touch_token, key_id=key_id))

    async def outputs_for(
        self, account_id: str, bucket_names: Sequence[str], output: str
    ) -> dict[str, str]:
        async with self.db.read() as conn:
            return await admin.outputs_for(conn, account_id, bucket_names, output)

    async def bucket_names(self, bucket_ids: Sequence[str]) -> dict[str, str]:
        async with self.db.read() as conn:
            return await admin.bucket_names(conn, bucket_ids)

    async def audit(self, **entry: str | None) -> None:
        await self.db.write(functools.partial(admin.audit, **entry))  # type: ignore[arg-type]

    async def list_audit(self, where: audit_log.AuditFilter) -> list[audit_log.AuditEntry]:
        """Audit entries matching `where`, newest first."""
        async with self.db.read() as conn:
            return await audit_log.list_entries(conn, where)

    # ---- events and the dead-letter queue --------------------------------------------

    async def list_events(self, where: events.EventFilter) -> list[models.EventSummary]:
        async with self.db.read() as conn:
            return await events.list_events(conn, where)

    async def get_event(self, account_id: str, event_id: str) -> models.EventDetail:
        async with self.db.read() as conn:
            summary, row, attempts = await events.get_event(conn, account_id, event_id)
        sealed_body = row.body_sealed
        if row.body_file:
            sealed_body = await asyncio.to_thread(self.bodies.read, row.id)
        query, headers, body = queue.open_payload(
            self.keyring, row.id, row.query_sealed, row.headers_sealed, sealed_body
        )
        return models.EventDetail(
            summary=summary, query=query, headers=headers, body=body, attempts=tuple(attempts)
        )

    async def replay_event(
        self, account_id: str, event_id: str, output: str | None = None
    ) -> list[str]:
        return await self.db.write(
            functools.partial(
                events.replay_event, account_id=account_id, event_id=event_id, output=output
            )
        )

    async def list_dead(self, where: events.DeadFilter) -> list[models.EventSummary]:
        async with self.db.read() as conn:
            return await events.list_dead(conn, where)

    async def dead_deliveries(self, where: events.DeadFilter) -> list[tuple[str, str, str]]:
        """(delivery id, event id, output) of the matching dead deliveries, oldest first."""
        async with self.db.read() as conn:
            return await events.dead_deliveries(conn, where)

    async def replay_dead(self, where: events.DeadFilter) -> list[str]:
        return await self.db.write(functools.partial(events.replay_dead, where=where))

    # ---- status --------------------------------------------------------------------

    async def status(self, account_id: str) -> StoreStatus:
        async with self.db.read() as conn:
            return StoreStatus(
                database_url=database.redact_url(self.db.settings.url),
                schema_revision=await admin.schema_revision(conn),
                deliveries=await admin.account_counts(conn, account_id),
                oldest_pending_ms=await admin.oldest_pending_ms(conn, account_id),
                database_files=self.database_files(),
            )

    def database_files(self) -> dict[str, int]:
        """SQLite only: bytes of the database file and its -wal/-shm (those that exist)."""
        main = self.db.settings.sqlite_file
        if main is None:
            return {}
        found: dict[str, int] = {}
        for path in (main, main.with_name(main.name + "-wal"), main.with_name(main.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                found[str(path)] = path.stat().st_size
        if self.db.bodies is not None and (size := self.db.bodies.total_bytes()) is not None:
            found[str(self.db.bodies.folder)] = size  # large bodies, one file each
        return found

    # ---- administration ------------------------------------------------------------

    async def create_account(self, name: str) -> models.Account:
        return await self.db.write(functools.partial(admin.create_account, name=name))

    async def get_account(self, name: str) -> models.Account:
        async with self.db.read() as conn:
            return await admin.get_account(conn, name)

    async def list_accounts(self) -> list[models.Account]:
        async with self.db.read() as conn:
            return await admin.list_accounts(conn)

    async def create_bucket(
        self, account_id: str, name: str, policy: models.BucketPolicy | None = None
    ) -> models.Bucket:
        return await self.db.write(
            functools.partial(
                admin.create_bucket,
                account_id=account_id,
                name=name,
                policy=policy or models.BucketPolicy(),
            )
        )

    async def update_bucket(
        self, bucket: models.Bucket, policy: models.BucketPolicy
    ) -> models.Bucket:
        return await self.db.write(
            functools.partial(admin.update_bucket, bucket=bucket, policy=policy)
        )

    async def create_output(
        self, bucket: models.Bucket, name: str, *, ordered: bool
    ) -> models.Output:
        return await self.db.write(
            functools.partial(outputs.create_output, bucket=bucket, name=name, ordered=ordered)
        )

    async def list_outputs(self, bucket: models.Bucket) -> list[models.Output]:
        async with self.db.read() as conn:
            return await outputs.list_outputs(conn, bucket)

    async def set_output_ordered(
        self, bucket: models.Bucket, name: str, *, ordered: bool
    ) -> models.Output:
        return await self.db.write(
            functools.partial(outputs.set_ordered, bucket=bucket, name=name, ordered=ordered)
        )

    async def delete_output(self, bucket: models.Bucket, name: str, *, force: bool) -> None:
        await self.db.write(
            functools.partial(outputs.delete_output, bucket=bucket, name=name, force=force)
        )

    async def get_bucket(self, account_id: str, name: str) -> models.Bucket:
        async with self.db.read() as conn:
            return await admin.get_bucket(conn, account_id, name)

    async def list_buckets(self, account_id: str) -> list[models.Bucket]:
        async with self.db.read() as conn:
            return await admin.list_buckets(conn, account_id)

    async def bucket_counts(self, bucket_id: str) -> dict[str, int]:
        async with self.db.read() as conn:
            return await admin.bucket_counts(conn, bucket_id)

    async def delete_bucket(self, bucket: models.Bucket, *, force: bool) -> None:
        await self.db.write(functools.partial(admin.delete_bucket, bucket=bucket, force=force))

    async def create_input(
        self, bucket: models.Bucket, name: str, max_body_bytes: int | None = None
    ) -> models.Input:
        return await self.db.write(
            functools.partial(
                admin.create_input, bucket=bucket, name=name, max_body_bytes=max_body_bytes
            )
        )

    async def list_inputs(
        self, account_id: str, bucket_id: str | None = None
    ) -> list[tuple[models.Input, str]]:
        async with self.db.read() as conn:
            return await admin.list_inputs(conn, account_id, bucket_id)

    async def delete_input(self, account_id: str, input_id: str) -> None:
        await self.db.write(
            functools.partial(admin.delete_input, account_id=account_id, input_id=input_id)
        )

    async def create_token(
        self,
        *,
        key_id: str,
        account_id: str,
        name: str,
        secret_hash: str,
        bucket_ids: Sequence[str],
    ) -> models.Token:
        return await self.db.write(
            functools.partial(
                admin.create_token,
                key_id=key_id,
                account_id=account_id,
                name=name,
                secret_hash=secret_hash,
                bucket_ids=bucket_ids,
            )
        )

    async def list_tokens(self, account_id: str) -> list[tuple[models.Token, list[str]]]:
        async with self.db.read() as conn:
            return await admin.list_tokens(conn, account_id)

    async def revoke_token(self, account_id: str, key_id: str) -> None:
        await self.db.write(
            functools.partial(admin.revoke_token, account_id=account_id, key_id=key_id)
        )

    async def rotate_token(
        self, account_id: str, key_id: str, secret_hash: str, grace_ms: int
    ) -> models.Token:
        return await self.db.write(
            functools.partial(
                admin.rotate_token,
                account_id=account_id,
                key_id=key_id,
                secret_hash=secret_hash,
                grace_ms=grace_ms,
            )
        )

    async def bind_token(self, account_id: str, key_id: str, cert_sha256: str | None) -> None:
        await self.db.write(
            functools.partial(
                admin.bind_token, account_id=account_id, key_id=key_id, cert_sha256=cert_sha256
            )
        )

    # ---- retention -----------------------------------------------------------------

    async def clean(
        self, *, limit: int = 500, sweep: retention.Sweep | None = None
    ) -> dict[str, int]:
        """One pass of the retention rules, `limit` rows per write transaction.

        `sweep`: the running cleaner's state (where its walks through old events and dead
        letters stopped, its pace); without it the walks start from the oldest, unpaced.
        Returns how many dedup keys, replay nonces, relayed answers, dead letters and events
        it deleted.
        """
        sweep = sweep if sweep is not None else retention.Sweep()
        return await retention.clean(self.db, sweep, now=models.now_ms(), limit=limit)


def _handed(
    event: models.IncomingEvent, slot: models.Slot, delivery_id: str, deadline_ms: int
) -> models.Lease:
    """The first lease of a delivery written LEASED at ingest, from the event in hand."""
    return models.Lease(
        lease_id=models.format_lease_id(delivery_id, 1),
        delivery_id=delivery_id,
        attempt=1,
        deadline=models.from_ms(deadline_ms),
        event_id=event.id,
        bucket=slot.bucket,
        output=slot.output,
        input_id=event.route.input.id,
        method=event.method,
        path=event.path,
        query=event.query,
        headers=event.headers,
        body=event.body,
        received_at=models.from_ms(models.to_ms(event.received_at)),  # as stored
        replay=False,
        caller_waits_until=event.caller_waits_until,
    )
