"""Hear other replicas' new events: one LISTEN connection per replica on PostgreSQL.

Ingest transactions end with `pg_notify` (store/replicas.py). Each replica keeps one
dedicated asyncpg connection that LISTENs on that channel and wakes, through the hub, the
sessions consuming the outputs named, so an agent on replica B gets an event that replica
A received at once instead of at its next poll.

It also hears REPLY_CHANNEL: an answer another replica left for a caller held here
(wait mode; dispatch/wait_relay.py).

Notifications are hints, never the only way work is found: sessions poll every
`--poll-interval` whatever happens, so a notification lost (the listener was down, the
database restarted) delays an event by at most that interval. The listener reconnects
with capped exponential backoff and logs `listener_down` / `listener_up`; on every
(re)connect it wakes all sessions once, for whatever was sent while nobody listened. A
connection that dies silently is found by a `SELECT 1` every `CHECK_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio

import asyncpg
import sqlalchemy as sa
import structlog

from relay_server import reaper
from relay_server.dispatch import hub as hub_mod
from relay_server.store import replicas, sql, wait_replies

log = structlog.get_logger(__name__)

APPLICATION_NAME = "stowhook-listener"  # how the connection shows in pg_stat_activity
CONNECT_TIMEOUT_S = 10.0
CHECK_INTERVAL_S = 10.0  # how often an idle listener checks its connection is alive
CHECK_TIMEOUT_S = 5.0
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0


class ListenerLost(ConnectionError):
    """The LISTEN connection was closed or stopped answering."""


def asyncpg_dsn(database_url: str) -> str:
    """The libpq-style DSN asyncpg takes, from the store's SQLAlchemy URL."""
    url = sa.engine.make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class Listener(reaper.Periodic):
    """LISTENs for other replicas' notifications while the server runs (PostgreSQL only)."""

    def __init__(self, store: sql.SqlStore, hub: hub_mod.Hub) -> None:
        super().__init__(store, RETRY_INITIAL_S)  # the interval is the reconnect delay
        self._hub = hub
        self._dsn = asyncpg_dsn(store.db.settings.async_url)
        self._failures = 0

    async def once(self) -> int:
        """One connection's life: connect, listen until it is lost or we stop."""
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=CONNECT_TIMEOUT_S,
                server_settings={"application_name": APPLICATION_NAME},
            )
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(replicas.CHANNEL, self._on_notification)
            await conn.add_listener(wait_replies.REPLY_CHANNEL, self._on_reply)
            log.info("listener_up", channel=replicas.CHANNEL, after_failures=self._failures)
            self._failures = 0
            self._interval_s = RETRY_INITIAL_S
            self._hub.notify_all()  # whatever was sent while nobody listened
            if self._hub.replies is not None:
                self._hub.replies.look_now()
            await self._hold(conn, lost)
        except Exception as exc:  # any failure: log, back off, reconnect (never end serve)
            self._down(exc)
        finally:
            if conn is not None:
                conn.terminate()
        return 0

    async def _hold(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when told to stop; raise ListenerLost when the connection goes."""
        while True:
            waits = {asyncio.create_task(self._stop.wait()), asyncio.create_task(lost.wait())}
            try:
                await asyncio.wait(waits, timeout=CHECK_INTERVAL_S, return_when="FIRST_COMPLETED")
            finally:
                for task in waits:
                    task.cancel()
            if self._stop.is_set():
                return
            if lost.is_set() or conn.is_closed():
                raise ListenerLost("the listener connection was closed")
            try:
                await conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)
            except TimeoutError as exc:
                raise ListenerLost(f"no answer to a check within {CHECK_TIMEOUT_S:g}s") from exc

    def _down(self, exc: Exception) -> None:
        self._failures += 1
        self._interval_s = min(RETRY_INITIAL_S * 2 ** (self._failures - 1), RETRY_MAX_S)
        log.warning(
            "listener_down",
            error=str(exc) or type(exc).__name__,
            failures=self._failures,
            retry_in_s=self._interval_s,
        )

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        origin, output_ids = replicas.parse(str(payload))
        if origin != replicas.ORIGIN:  # our own ingests woke our sessions already
            self._hub.notify(output_ids, every=True)  # a whole commit group's news

    def _on_reply(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if self._hub.replies is not None:  # an answer relayed for a caller held somewhere
            self._hub.replies.heard(str(payload))
