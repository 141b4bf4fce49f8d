"""The database handle: engine, dialect set-up, group-committed writes, error mapping.

SQLite has one writer: every write in this process goes through one task that runs
whatever is queued as one transaction (group commit), so N concurrent ingests cost one
fsync, not N. If a group fails, its operations are retried one by one so one bad
operation cannot fail its neighbours. The hottest writes (ingest, claims, ACKs) are
plain sqlite3 functions (`PlainWrites`), run in the driver's own thread: there a drain
takes whatever is waiting, commits it, hands the results back to the event loop and
takes the next group at once, so under load the writer never waits for the loop.
PostgreSQL runs each write in its own pooled transaction; its row locks do the
serialising.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import pathlib
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from relay_server import errors
from relay_server.store import bodyfiles

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")
WriteOp = Callable[[AsyncConnection], Awaitable[T]]


PlainWrite = Callable[[sqlite3.Connection], T]  # plain sqlite3, in the driver's thread
PlainMany = Callable[[sqlite3.Connection, list[Any]], Sequence[Any]]

log = structlog.get_logger(__name__)

MIGRATIONS = pathlib.Path(__file__).resolve().parent.parent / "migrations"
# The newest migration in MIGRATIONS (checked by tests/integration/test_migrations.py).
SCHEMA_HEAD = "0007"
SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
SQLITE_PAGE_SIZE = 16384
CLOSE_GRACE_S = 5.0  # close() waits this long at most for operations still under way
DEFAULT_POOL_SIZE = 10
DEFAULT_CONNECT_TIMEOUT_MS = 5_000
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseSettings:
    url: str
    sqlite_synchronous: str = "FULL"  # FULL: a 2xx survives power loss, not just a crash
    sqlite_busy_timeout_ms: int = 5000
    max_group: int = 512  # operations committed together at most
    # PostgreSQL: connections kept per process (SQLAlchemy opens up to 10 more in bursts).
    pool_size: int = DEFAULT_POOL_SIZE
    # PostgreSQL: give up opening a connection, or waiting for a pooled one, after this.
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_MS / 1000
    # PostgreSQL: the server cancels a statement running longer (0: never); not applied
    # to migrations, which may rewrite big tables.
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS

    def __post_init__(self) -> None:
        if not (self.url.startswith("sqlite") or self.url.startswith("postgresql")):
            raise errors.ConfigError(
                f"unsupported database URL {redact_url(self.url)!r}: use "
                "sqlite+aiosqlite:///path/to/file.db or postgresql+asyncpg://user@host/db"
            )
        if self.sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
            raise errors.ConfigError(f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS}")
        if self.sqlite_busy_timeout_ms < 0:
            raise errors.ConfigError("the SQLite busy timeout cannot be negative")
        if self.pool_size < 1:
            raise errors.ConfigError("the database pool size must be at least 1")
        if self.connect_timeout_s <= 0:
            raise errors.ConfigError("the database connect timeout must be positive")
        if self.statement_timeout_ms < 0:
            raise errors.ConfigError("the database statement timeout cannot be negative")

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def sqlite_file(self) -> pathlib.Path | None:
        """The SQLite database file; None on PostgreSQL and for an in-memory database."""
        name = sa.engine.make_url(self.url).database if self.is_sqlite else None
        return pathlib.Path(name) if name and name != ":memory:" else None

    @property
    def async_url(self) -> str:
        if self.url.startswith("sqlite:"):
            return "sqlite+aiosqlite:" + self.url.removeprefix("sqlite:")
        if self.url.startswith("postgresql:") or self.url.startswith("postgresql+psycopg"):
            return "postgresql+asyncpg:" + self.url.split(":", 1)[1]
        return self.url


def split_by_size(items: Sequence[T], size: Callable[[T], int], limit: int) -> list[list[T]]:
    """`items` in order, in runs whose sizes add up to `limit` at most (a bigger one alone):
    batches that bound what one transaction holds in memory."""
    runs: list[list[T]] = [[]]
    total = 0
    for item in items:
        n = size(item)
        if runs[-1] and total + n > limit:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += n
    return runs


def redact_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<unparseable URL>"


def translate(exc: BaseException) -> errors.StorageError:
    """Map a driver error to the storage error tree (the caller raises `from exc`)."""
    text = str(getattr(exc, "orig", exc))
    if _is_unavailable(exc):
        return errors.StorageUnavailable(f"database unavailable: {text}")
    if isinstance(exc, sa_exc.IntegrityError):
        return errors.StorageError(f"integrity error: {text}")
    return errors.StorageError(f"database error: {text}")


# SQLSTATE classes that mean "not now" rather than "never": connection exceptions (08),
# transaction rollbacks such as deadlocks (40), insufficient resources (53), objects not
# ready, e.g. a database not accepting connections (55), operator intervention: shutdown,
# restart, statement timeout (57), and I/O errors (58).
UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "55", "57", "58"})
CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock, serialization failure
CONFLICT_TRIES = 3  # a write rolled back for a conflict runs this often at most
CONFLICT_DELAY_S = 0.02  # times the try number: a random pause before running it again


def _is_unavailable(exc: BaseException) -> bool:
    """Whether the database failed, rather than the statement: worth a 503 and a retry.

    SQLAlchemy wraps most asyncpg errors in a plain DBAPIError, so the SQLSTATE and the
    exception chain (down to asyncpg's or the socket's own error) decide.
    """
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    for current in _chain(exc):
        if isinstance(current, (sa_exc.OperationalError, sa_exc.InterfaceError, OSError)):
            return True
        if isinstance(current, sa_exc.TimeoutError):  # no pooled connection came free
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES:
            return True
        if _is_asyncpg_client_error(current):
            return True
    return False


def _is_conflict(exc: BaseException) -> bool:
    """A deadlock (40P01) or serialization failure (40001): the same write may succeed."""
    return any(getattr(e, "sqlstate", None) in CONFLICT_SQLSTATES for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it wraps (SQLAlchemy's `orig`, else `__cause__`), 8 deep at most."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        yield current
        current = getattr(current, "orig", None) or current.__cause__


def _is_asyncpg_client_error(exc: BaseException) -> bool:
    """asyncpg's own connection errors ("connection is closed", "another operation is in
    progress" on a connection being torn down), not bad data (DataError is a ValueError)."""
    return (
        type(exc).__module__.startswith("asyncpg")
        and getattr(exc, "sqlstate", None) is None
        and not isinstance(exc, ValueError)
    )


def _is_driver_error(exc: BaseException) -> bool:
    if isinstance(exc, (sa_exc.SQLAlchemyError, OSError)):
        return True
    # asyncpg raises its own exceptions for lost connections.
    return type(exc).__module__.startswith("asyncpg")


class Database:
    """An engine plus a write path (group commit on SQLite)."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine = _make_engine(settings)
        # SQLAlchemy writes for the SQLite writer; plain sqlite3 ones wait in _plain.
        self._queue: collections.deque[tuple[WriteOp[Any], asyncio.Future[Any]]] = (
            collections.deque()
        )
        self._plain = PlainWrites(settings.max_group, settings.sqlite_synchronous.upper())
        # SQLite: large bodies go to files beside the database (store/bodyfiles.py).
        sqlite_file = settings.sqlite_file
        self.bodies = (
            None
            if sqlite_file is None
            else bodyfiles.BodyFiles.beside(
                sqlite_file, sync=settings.sqlite_synchronous.upper() != "OFF"
            )
        )
        self._wake = asyncio.Event()  # something was queued for the writer
        self._writer: asyncio.Task[None] | None = None
        self._conn: AsyncConnection | None = None
        self._closed = False
        self._coalesced: dict[str, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._group_tasks: set[asyncio.Task[None]] = set()
        # Pooled (PostgreSQL) operations under way: close() lets them end before disposing
        # of the pool, or a connection handed back afterwards would never be closed.
        self._in_use = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def open(self) -> None:
        if self._writer is not None or self._closed:
            raise RuntimeError("database already opened")
        if self.settings.is_sqlite:
            self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._plain.stop = True  # a drain under way ends after the group it is committing
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(errors.StorageUnavailable("database is closing"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), CLOSE_GRACE_S)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()  # queued behind a drain still running: after it
        self._plain.fail_all(errors.StorageUnavailable("database is closing"))
        await self.engine.dispose()

    async def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        try:
            async with self.engine.begin() as conn:
                if self.dialect == "postgresql":  # a migration may rewrite a big table
                    await conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
                await conn.run_sync(_upgrade)
        except Exception as exc:
            if _is_driver_error(exc):
                raise translate(exc) from exc
            raise

    async def write(
        self, op: WriteOp[T], *, sqlite: PlainWrite[T] | None = None, durable: bool = True
    ) -> T:
        """Run `op` in a write transaction; returns after the commit. `sqlite`, the same
        in plain sqlite3, is run instead on SQLite (see PlainWrites).

        `durable=False` (lease and ACK transitions, which at worst deliver an event again
        if lost): on SQLite the plain write's group, if nothing durable shares it, commits
        with synchronous=NORMAL, no fsync of its own; it survives a crash of this process,
        and the next durable commit makes it survive power loss too. On PostgreSQL the
        transaction commits with synchronous_commit off: it does not wait for its WAL flush,
        which the WAL writer does within a few hundred milliseconds (a crash of the database
        server can lose it, never corrupt it).
        """
        if self._closed:
            raise errors.StorageUnavailable("database is closed")
        if self._writer is None:
            if not durable and self.dialect == "postgresql":
                return await self._write_alone(functools.partial(_relaxed, op))
            return await self._write_alone(op)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if sqlite is None:
            self._queue.append((op, future))
            self._plain.yield_to_others = True  # a drain under way lets it in soon
        else:
            self._plain.single.append((sqlite, future, durable))
        self._wake.set()
        result: T = await future
        return result

    async def probe_write(self) -> None:
        """Take the write lock and commit an empty transaction, through the writer.

        Readiness checks call this: it fails exactly when an ingest would (locked, gone,
        read-only), yet writes nothing, and in a group commit it costs no extra fsync.
        """
        await self.write(_probe)

    async def write_coalesced(
        self,
        key: str,
        apply_many: Callable[[AsyncConnection, list[Any]], Awaitable[Sequence[Any]]],
        item: Any,
        *,
        sqlite_many: PlainMany | None = None,
    ) -> Any:
        """Add `item` to the next `apply_many` call for `key`; returns its result after commit.

        Items that arrive while one call waits for the writer join it, so N concurrent
        writes of one kind cost one statement per table instead of N. `apply_many` returns
        one result per item, in order; `sqlite_many`, the same in plain sqlite3, is used
        instead on SQLite (see PlainWrites).
        """
        if self._closed:
            raise errors.StorageUnavailable("database is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._writer is not None and sqlite_many is not None:
            self._plain.waiting(key, sqlite_many).append((item, future))
            self._wake.set()
            return await future
        waiting = self._coalesced.setdefault(key, [])
        waiting.append((item, future))
        if len(waiting) == 1:
            group = self._write_group(key, apply_many)
            task = asyncio.create_task(group, name=f"write-{key}")
            self._group_tasks.add(task)
            task.add_done_callback(self._group_tasks.discard)
        return await future

    async def _write_group(
        self,
        key: str,
        apply_many: Callable[[AsyncConnection, list[Any]], Awaitable[Sequence[Any]]],
    ) -> None:
        taken: list[tuple[Any, asyncio.Future[Any]]] = []

        def take() -> list[Any]:
            # Take the waiting items once, when the op is about to run: later ones join
            # the next group; if the group this op ran in fails and the op is retried
            # alone, it retries the same items (their first try was rolled back).
            if not taken:
                taken[:] = self._coalesced.pop(key, [])
            return [item for item, _ in taken]

        async def op(conn: AsyncConnection) -> Sequence[Any]:
            return await apply_many(conn, take())

        try:
            results = await self.write(op)
        except Exception as exc:
            taken = taken or self._coalesced.pop(key, [])
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(taken, results, strict=True):
            if not future.done():
                future.set_result(result)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        if self._closed:
            raise errors.StorageUnavailable("database is closed")
        try:
            async with self._using(), self.engine.connect() as conn:
                yield conn
        except Exception as exc:
            if _is_driver_error(exc):
                raise translate(exc) from exc
            raise

    async def _write_alone(self, op: WriteOp[T]) -> T:
        for attempt in range(1, CONFLICT_TRIES + 1):
            try:
                async with self._using(), self.engine.begin() as conn:
                    return await op(conn)
            except Exception as exc:
                if not _is_driver_error(exc):
                    raise
                if attempt < CONFLICT_TRIES and _is_conflict(exc):
                    # PostgreSQL rolled the transaction back for a deadlock or a
                    # serialization failure: nothing of it stands, so run it again.
                    log.info("write_retried", attempt=attempt, error=str(exc.__cause__ or exc))
                    await asyncio.sleep(random.uniform(0, CONFLICT_DELAY_S * attempt))
                    continue
                raise translate(exc) from exc
        raise AssertionError("unreachable")  # the last attempt returned or raised

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[None]:
        self._in_use += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_use -= 1
            if self._in_use == 0:
                self._idle.set()

    async def _writer_conn(self) -> AsyncConnection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            conn = await self.engine.connect()
            self._conn = await conn.execution_options(stowhook_begin="BEGIN IMMEDIATE")
        return self._conn

    async def _write_loop(self) -> None:
        while True:
            self._wake.clear()
            if self._plain.pending():
                await self._drain()
            if self._queue:
                await self._write_sqlalchemy()
            elif not self._plain.pending():
                await self._wake.wait()

    async def _drain(self) -> None:
        """Run PlainWrites.drain in the driver's thread until nothing plain is waiting."""
        self._plain.yield_to_others = bool(self._queue)
        try:
            conn = await self._writer_conn()
            error = await _in_sqlite_thread(conn, self._plain.drain, asyncio.get_running_loop())
        except Exception as exc:  # no connection, or the hop itself broke
            error = exc
            self._plain.fail_all(exc)
        if error is not None:
            await self._after_failure(error)

    async def _write_sqlalchemy(self) -> None:
        batch: list[tuple[WriteOp[Any], asyncio.Future[Any]]] = []
        while self._queue and len(batch) < self.settings.max_group:
            op, future = self._queue.popleft()
            if not future.cancelled():
                batch.append((op, future))
        if not batch:
            return
        try:
            await self._run_group(batch)
        except Exception as exc:
            if len(batch) == 1:
                return  # _run_group already failed its one future
            if _is_unavailable(exc):
                # The database itself failed (locked, full, gone): so would each
                # operation alone. Fail them all now rather than one timeout each.
                self._fail_all(batch, exc)
                return
            for item in batch:  # one operation broke the group: find it
                with contextlib.suppress(Exception):
                    await self._run_group([item])

    async def _run_group(self, batch: list[tuple[WriteOp[Any], asyncio.Future[Any]]]) -> None:
        results: list[Any] = []
        try:
            conn = await self._writer_conn()
            async with conn.begin():
                for op, _ in batch:
                    results.append(await op(conn))
        except Exception as exc:
            await self._after_failure(exc)
            if len(batch) == 1:
                _, future = batch[0]
                if not future.done():
                    future.set_exception(_for_caller(exc))
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _fail_all(
        self, batch: list[tuple[WriteOp[Any], asyncio.Future[Any]]], exc: Exception
    ) -> None:
        for _, future in batch:
            if not future.done():
                error = translate(exc)
                error.__cause__ = exc
                future.set_exception(error)

    async def _after_failure(self, exc: BaseException) -> None:
        conn = self._conn
        # A locked, full or broken connection, or a transaction the rollback could not
        # end: start the next group on a fresh connection, never inside a stale BEGIN.
        if conn is not None and (_is_unavailable(exc) or _stuck_in_transaction(conn)):
            with contextlib.suppress(Exception):
                await conn.invalidate()
            self._conn = None
        if _is_driver_error(exc):
            log.warning("database_write_failed", error=str(getattr(exc, "orig", exc)))


async def _in_sqlite_thread(conn: AsyncConnection, fn: Callable[..., T], *args: Any) -> T:
    """`fn(sqlite3 connection, *args)` in the thread aiosqlite runs that connection in.

    aiosqlite has no public call for this; its `_execute` queue is what SQLAlchemy's own
    aiosqlite dialect feeds (to set the isolation level). A sqlite3 error comes out as
    SQLAlchemy would have raised it (OperationalError, IntegrityError, ...), parameters
    hidden, so the error mapping above applies unchanged.
    """
    driver: Any = (await conn.get_raw_connection()).driver_connection
    try:
        result: T = await driver._execute(fn, driver._conn, *args)
        return result
    except sqlite3.Error as exc:
        raise _sqlalchemy_error(exc) from exc


def _sqlalchemy_error(exc: BaseException) -> BaseException:
    """A sqlite3 error as SQLAlchemy raises it (parameters hidden); others unchanged."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    error = sa_exc.DBAPIError.instance(
        "(a plain sqlite3 write)", None, exc, sqlite3.Error, hide_parameters=True
    )
    error.__cause__ = exc
    return error


def _for_caller(exc: BaseException) -> BaseException:
    """What a caller whose write failed gets: a storage error for a driver's, else `exc`."""
    if not _is_driver_error(exc):
        return exc
    error = translate(exc)
    error.__cause__ = exc
    return error


class PlainWrites:
    """Plain sqlite3 writes waiting for the SQLite writer, and the drain that runs them.

    The event loop appends; the drain, in the driver's thread, takes. It takes every
    write waiting (a coalesced key's items as one call), commits them as one group,
    hands the results back to the loop (one `call_soon_threadsafe` per group) and takes
    again at once: under load the next group starts as soon as the last one is durable,
    not after the loop has heard of it. That hop had to win the GIL from a busy loop,
    ~2 ms a group. `deque.append` and `popleft` are atomic, so exactly one drain takes
    each write, and the loop side needs no lock.
    """

    GROUPS_PER_DRAIN = 64  # then the drain ends, so SQLAlchemy writes get their turn

    def __init__(self, max_group: int, synchronous: str = "FULL") -> None:
        self.max_group = max_group
        # (write, future, durable): see Database.write
        self.single: collections.deque[tuple[PlainWrite[Any], asyncio.Future[Any], bool]] = (
            collections.deque()
        )
        # A group of non-durable writes only commits at this level, then the connection's
        # own is set back (SQLAlchemy writes share the connection). None: no change, the
        # configured level is NORMAL or OFF already.
        self.synchronous = synchronous
        self.relaxed = "NORMAL" if synchronous in ("FULL", "EXTRA") else None
        self._many: dict[tuple[str, PlainMany], collections.deque[Any]] = {}
        self.stop = False  # set on close: the drain ends after the group it is committing
        self.yield_to_others = False  # set when a SQLAlchemy write waits: the drain ends

    def waiting(self, key: str, many: PlainMany) -> collections.deque[Any]:
        """The (item, future) pairs waiting for `many` under `key`."""
        found = self._many.get((key, many))
        if found is None:
            found = self._many[(key, many)] = collections.deque()
        return found

    def pending(self) -> bool:
        return bool(self.single) or any(self._many.values())

    def fail_all(self, exc: BaseException) -> None:
        """On the loop: every write still waiting fails with `exc`."""
        futures = [future for _, future, _ in _pop_all(self.single, None)]
        for waiting in self._many.values():
            futures += [future for _, future in _pop_all(waiting, None)]
        for future in futures:
            if not future.done():
                future.set_exception(_for_caller(exc))

    def drain(
        self, db: sqlite3.Connection, loop: asyncio.AbstractEventLoop
    ) -> BaseException | None:
        """In the driver's thread: commit groups until none waits. Returns the error that
        makes the connection suspect (the loop replaces it), else None."""
        for _ in range(self.GROUPS_PER_DRAIN):
            if self.stop:
                return None
            group = self._take()
            if not group:
                return None
            error = self._commit(db, loop, group)
            if error is not None:
                return error
            if self.yield_to_others:
                return None
        return None

    def _take(self) -> list[_Run]:
        group = [
            _Run(write, (future,), many=False, durable=durable)
            for write, future, durable in _pop_all(self.single, self.max_group)
            if not future.cancelled()
        ]
        for (_, many), waiting in list(self._many.items()):
            taken = _pop_all(waiting, self.max_group)
            if taken:
                items = [item for item, _ in taken]
                group.append(_Run(_many_run(many, items), tuple(f for _, f in taken), many=True))
        return group

    def _commit(
        self, db: sqlite3.Connection, loop: asyncio.AbstractEventLoop, group: list[_Run]
    ) -> BaseException | None:
        relaxed = None if any(run.durable for run in group) else self.relaxed
        try:
            results = _transaction(db, [run.write for run in group], relaxed, self.synchronous)
        except Exception as exc:
            error = _sqlalchemy_error(exc)
            if len(group) == 1 or _is_unavailable(error):
                loop.call_soon_threadsafe(_fail, group, error)
                suspect = _is_unavailable(error) or db.in_transaction
                return error if suspect else None
            for position, run in enumerate(group):  # one write broke the group: each alone
                error_alone = self._commit(db, loop, [run])
                if error_alone is not None:  # the database failed: so would the rest
                    loop.call_soon_threadsafe(_fail, group[position + 1 :], error_alone)
                    return error_alone
            return None
        loop.call_soon_threadsafe(_deliver, group, results)
        return None


@dataclass(frozen=True, slots=True)
class _Run:
    write: PlainWrite[Any]
    futures: tuple[asyncio.Future[Any], ...]
    many: bool  # a coalesced call: one result per future, in order
    durable: bool = True  # coalesced calls (ingest) always are


def _many_run(many: PlainMany, items: list[Any]) -> PlainWrite[Sequence[Any]]:
    def run(db: sqlite3.Connection) -> Sequence[Any]:
        results = many(db, items)
        if len(results) != len(items):  # checked here, so the group rolls back
            raise RuntimeError(f"{many.__name__} returned {len(results)} results for {len(items)}")
        return results

    return run


def _pop_all(waiting: collections.deque[Any], most: int | None) -> list[Any]:
    taken: list[Any] = []
    while most is None or len(taken) < most:
        try:
            taken.append(waiting.popleft())
        except IndexError:
            break
    return taken


def _deliver(group: list[_Run], results: list[Any]) -> None:
    """On the loop: each future of a committed group gets its result."""
    for run, result in zip(group, results, strict=True):
        if run.many:
            for future, one in zip(run.futures, result, strict=True):
                if not future.done():
                    future.set_result(one)
        elif not run.futures[0].done():
            run.futures[0].set_result(result)


def _fail(group: list[_Run], exc: BaseException) -> None:
    """On the loop: each future of a failed group gets the error."""
    for run in group:
        for future in run.futures:
            if not future.done():
                future.set_exception(_for_caller(exc))


def _transaction(
    db: sqlite3.Connection,
    runs: list[PlainWrite[Any]],
    relaxed: str | None = None,
    synchronous: str = "FULL",
) -> list[Any]:
    """A group of plain writes as one transaction: BEGIN IMMEDIATE, each write, COMMIT;
    committed at the `relaxed` synchronous level if given, `synchronous` restored after.

    In WAL mode a commit at NORMAL appends to the log without an fsync: it survives the
    process dying, and the next FULL commit's fsync covers it, the log being in order.
    """
    if relaxed is not None:
        db.execute(f"PRAGMA synchronous = {relaxed}")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            results = [run(db) for run in runs]
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        if relaxed is not None:
            db.execute(f"PRAGMA synchronous = {synchronous}")
    return results


async def _relaxed(op: WriteOp[T], conn: AsyncConnection) -> T:
    """`op` in a PostgreSQL transaction that does not wait for its commit to be flushed."""
    await conn.execute(_NO_FLUSH_WAIT)
    return await op(conn)


_NO_FLUSH_WAIT = sa.text("SET LOCAL synchronous_commit = off")


def _stuck_in_transaction(conn: AsyncConnection) -> bool:
    try:
        return conn.in_transaction()
    except Exception:
        return True  # cannot tell: assume the worst, the connection is cheap to replace


async def _probe(conn: AsyncConnection) -> None:
    await conn.execute(sa.text("SELECT 1"))


def _make_engine(settings: DatabaseSettings) -> AsyncEngine:
    if not settings.is_sqlite:
        # pool_pre_ping: a connection the server dropped (restart, failover) is replaced
        # when it is next checked out, instead of failing the request that drew it.
        return create_async_engine(
            settings.async_url,
            pool_size=settings.pool_size,
            pool_timeout=settings.connect_timeout_s,
            pool_pre_ping=True,
            connect_args=_asyncpg_connect_args(settings),
        )
    engine = create_async_engine(settings.async_url)
    _configure_sqlite(engine, settings)
    return engine


def _asyncpg_connect_args(settings: DatabaseSettings) -> dict[str, Any]:
    return {
        "timeout": settings.connect_timeout_s,
        "server_settings": {"statement_timeout": str(settings.statement_timeout_ms)},
    }


def _configure_sqlite(engine: AsyncEngine, settings: DatabaseSettings) -> None:
    synchronous = settings.sqlite_synchronous.upper()

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (SQLAlchemy docs:
        # "Serializable isolation / Savepoints / Transactional DDL" for pysqlite).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(settings.sqlite_busy_timeout_ms)}")
        # New files only (set before WAL; an existing file keeps its size): sealed bodies
        # of a MiB or more are chains of overflow pages, and 16 KiB pages write a 10 MiB
        # body in half the time of 4 KiB ones, while small rows cost the same.
        cursor.execute(f"PRAGMA page_size = {SQLITE_PAGE_SIZE}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa_event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("stowhook_begin", "BEGIN"))


def migration_config(sync_conn: sa.Connection) -> Config:
    """Alembic's configuration, running on `sync_conn`."""
    from alembic.config import Config  # imported here: alembic only when migrating

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = sync_conn
    return config


def _upgrade(sync_conn: sa.Connection) -> None:
    """Migrate to the newest revision, unless the database is there already.

    Every CLI command calls this; reading one row is much cheaper than loading alembic
    and its scripts (tests/integration/test_migrations.py keeps SCHEMA_HEAD honest).
    """
    if _revision(sync_conn) == SCHEMA_HEAD:
        return
    from alembic import command

    command.upgrade(migration_config(sync_conn), "head")


def _revision(sync_conn: sa.Connection) -> str | None:
    if not sa.inspect(sync_conn).has_table("alembic_version"):
        return None
    return sync_conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
