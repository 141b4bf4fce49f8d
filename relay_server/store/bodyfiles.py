"""SQLite: large bodies as sealed files next to the database, not as blobs inside it.

A body of `FROM_BYTES` or more is sealed exactly as it would be in the events row (AES-256-
GCM under the ring's primary key, associated data "<event id>:body") and written to
`<database>.bodies/<event id>`; the row then holds a sealed empty body and `body_file`
set. SQLite writes a blob twice (its log, then the database file at the checkpoint),
through its page cache in page-sized pieces, on its one writer thread: a 10 MiB body took
~45 ms of that thread's time where a file takes one write and one fdatasync, on any thread
while the writer commits other events. bench/ingest.py's large-body figure measures it.

Durability keeps the order of the rest: the file is written, fdatasync'ed and its
directory entry fsync'ed before the row that names it commits, so a 2xx means both are on
disk. A crash between leaves a file no row names; a deleted event (retention, a deleted
bucket or account) leaves one too. The retention cleaner removes such files on every pass
once they are older than `ORPHAN_GRACE_S` (a file that young may belong to a commit still
under way). The file is sealed like the row, so until then it is ciphertext only the key
file opens, as a deleted row is in SQLite's free pages.

PostgreSQL keeps every body in its row (TOAST stores it out of line already, and another
replica must be able to read it).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pathlib
import re
import threading
import time
from collections.abc import Iterable

import structlog

from relay_server import crypto, errors

log = structlog.get_logger(__name__)

FROM_BYTES = 1024 * 1024
DIRECT_CHUNK = 1024 * 1024  # bytes per O_DIRECT write: a multiple of any block size
DIRECT_ALIGN = 4096  # the last block is padded to this, then the file cut to its length
ORPHAN_GRACE_S = 600.0  # an unnamed file younger than this may await its row's commit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # event ids (ids.new_id), nothing else


class BodyFiles:
    """The folder of one SQLite database's body files."""

    def __init__(self, folder: pathlib.Path, *, sync: bool = True) -> None:
        self.folder = folder
        self.sync = sync  # fdatasync files and fsync the folder (off with synchronous=OFF)
        self.direct = hasattr(os, "O_DIRECT")  # until the file system refuses it

    @classmethod
    def beside(cls, database: pathlib.Path, *, sync: bool = True) -> BodyFiles:
        return cls(database.with_name(database.name + ".bodies"), sync=sync)

    def path(self, event_id: str) -> pathlib.Path:
        if not _NAME.fullmatch(event_id):
            raise errors.StorageError(f"not an event id: {event_id!r}")
        return self.folder / event_id

    def write(self, event_id: str, record: Iterable[bytes]) -> None:
        """Write a sealed body, given in pieces, durably (blocking: run it in a thread).
        An existing file of the same event is an error: ids are never reused."""
        path = self.path(event_id)
        self._make_folder()
        fd, direct = self._create(path)
        try:
            if direct:
                _write_direct(fd, record)
            else:
                for piece in record:
                    _write_all(fd, piece)
            if self.sync:
                os.fdatasync(fd)
        except BaseException as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if direct and isinstance(exc, OSError) and exc.errno == errno.EINVAL:
                self.direct = False  # alignment refused: the sender's retry goes buffered
            raise
        os.close(fd)
        if self.sync:
            _sync_folder(self.folder)

    def _make_folder(self) -> None:
        """The folder, made durably the first time (its entry in the database's folder)."""
        try:
            self.folder.mkdir(mode=0o700)
        except FileExistsError:
            return
        if self.sync:
            _sync_folder(self.folder.parent)

    def _create(self, path: pathlib.Path) -> tuple[int, bool]:
        """A new file, opened O_DIRECT where the file system allows it (some refuse it)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o600), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
                log.info("body_files_buffered", folder=str(self.folder), reason=str(exc))
        return os.open(path, flags, 0o600), False

    def replace(self, event_id: str, record: bytes) -> None:
        """Swap the file's content for `record` atomically (rekey): a temporary file,
        synced, renamed over it."""
        path = self.path(event_id)
        temporary = path.with_name(path.name + ".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, record)
            if self.sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        if self.sync:
            _sync_folder(self.folder)

    def read(self, event_id: str) -> bytes:
        """The sealed body; StorageError naming the file if it is gone."""
        path = self.path(event_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise errors.StorageError(f"the body file {path} is missing") from None

    def read_many(self, event_ids: Iterable[str]) -> dict[str, bytes | None]:
        """Event id -> sealed body, None where the file is missing."""
        found: dict[str, bytes | None] = {}
        for event_id in event_ids:
            try:
                found[event_id] = self.read(event_id)
            except errors.StorageError:
                found[event_id] = None
        return found

    def discard(self, event_ids: Iterable[str]) -> None:
        """Remove the files of events that were not stored (a duplicate, a replay)."""
        for event_id in event_ids:
            with contextlib.suppress(FileNotFoundError):
                self.path(event_id).unlink()

    def names(self) -> list[str]:
        """The event ids that have a file (leftover temporary files are removed)."""
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if _NAME.fullmatch(entry.name):
                found.append(entry.name)
            elif entry.name.endswith(".new") and _older_than(entry.path, ORPHAN_GRACE_S):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)  # a rekey interrupted before its rename
        return found

    def remove_orphans(self, event_ids: Iterable[str], *, grace_s: float) -> int:
        """Remove the files of `event_ids` (that no row names) older than `grace_s`;
        returns how many went."""
        removed = 0
        for event_id in event_ids:
            path = self.path(event_id)
            if _older_than(path, grace_s):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def total_bytes(self) -> int | None:
        """Bytes in the folder's files; None when there is no folder."""
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return None
        total = 0
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
        return total


def _sync_folder(folder: pathlib.Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reseal(files: BodyFiles, keyring: crypto.KeyRing, event_id: str, aad: bytes) -> bool:
    """Re-encrypt one body file under the primary key (blocking); False if it was already.
    CryptoError if the ring cannot open it, StorageError if it is missing."""
    record = files.read(event_id)
    if keyring.is_sealed_with_primary(record):
        return False
    files.replace(event_id, keyring.seal(keyring.open(record, aad), aad))
    return True


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _AlignedBuffer(threading.local):
    """One page-aligned buffer per writing thread, for O_DIRECT writes."""

    view: memoryview | None = None

    def get(self) -> memoryview:
        if self.view is None:
            self.view = memoryview(mmap.mmap(-1, DIRECT_CHUNK))
        return self.view


_aligned = _AlignedBuffer()


def _write_direct(fd: int, record: Iterable[bytes]) -> None:
    """Write `record`'s pieces to an O_DIRECT file in aligned DIRECT_CHUNK blocks, the last
    padded to a block and the file then cut to its length. The data goes from the buffer
    to the disk without a copy into the page cache: buffered, the kernel spent ~1.1 ms of
    CPU per MiB written (and fdatasync'ed) here, O_DIRECT ~0.2 ms."""
    buffer = _aligned.get()
    filled = total = 0
    for piece in record:
        rest = memoryview(piece)
        while rest:
            n = min(len(rest), DIRECT_CHUNK - filled)
            buffer[filled : filled + n] = rest[:n]
            filled += n
            rest = rest[n:]
            if filled == DIRECT_CHUNK:
                _write_all(fd, buffer)
                total += filled
                filled = 0
    if filled:
        _write_all(fd, buffer[: -(-filled // DIRECT_ALIGN) * DIRECT_ALIGN])
        total += filled
        os.ftruncate(fd, total)


def _older_than(path: str | pathlib.Path, seconds: float) -> bool:
    """Whether the file was last written `seconds` ago or more (False if it is gone)."""
    try:
        return time.time() - os.stat(path).st_mtime >= seconds
    except FileNotFoundError:
        return False
