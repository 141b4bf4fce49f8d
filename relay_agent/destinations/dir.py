"""The dir destination: one file per event in a spool directory, complete or absent.

The contract with whoever reads the directory (docs/destinations.md says the same):

* Names: `<received_at>-<event id>.json`, the time as `YYYYMMDDTHHMMSS.ffffffZ` in UTC,
  e.g. `20240501T120000.123456Z-01a2…e4.json`: `ls` lists events in the order the server
  received them, and the time-ordered event id (UUIDv7) breaks ties.
* A file appears complete or not at all. It is written to a temporary name in the same
  directory (`.<final name>.<random>.tmp`), flushed and fsynced, renamed over its final
  name, and the directory is fsynced; only then is the event ACKed. A crash leaves at
  most a dot-file, never a partial file under a final name: readers must skip names that
  start with ".". Leftover temporary files are deleted when the agent starts.
* At least once, one file per event: a redelivery of an event (lost ACK, retry after a
  crash, replay) writes the same final name again, replacing it. A reader that deletes
  or moves files it has handled may see an event again after a replay.
* json format (default): one UTF-8 JSON object per file:
  `{"version": 1, "event_id", "bucket", "output", "input_id", "method", "path", "query",
  "received_at" (ISO 8601, UTC), "attempt", "replay", "headers": [[name, value], …]
  (in order, duplicates kept), "body_size", "body_encoding": "utf-8" | "base64", "body"}`.
  The body is text when it is valid UTF-8, else base64.
* raw format: `<name>.body` holds the body bytes as received, and `<name>.meta.json` the
  same object without `body`/`body_encoding` but with `"body_file"`. The body is written
  first; the meta file last, so its presence means the pair is complete.
* Files are created with mode 0640 (minus the umask). A write that fails (disk full,
  permissions) is NACKed with the reason and retried with the bucket's backoff.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import pathlib
import re
import secrets
from typing import Any

import structlog

from relay_agent import errors, models, settings

log = structlog.get_logger(__name__)

ENVELOPE_VERSION = 1
FILE_MODE = 0o640
DIR_MODE = 0o750
_NAME_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_ISO_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# Event ids are UUIDs; anything else must not be able to steer a path.
_SAFE_EVENT_ID = re.compile(r"[0-9A-Za-z_-]{1,100}")
# Our temporary files, and only ours: ".<final name>.<8 hex>.tmp".
_TEMP_NAME = re.compile(r"\.\d{8}T\d{6}\.\d{6}Z-[0-9A-Za-z_-]+\.[a-z.]+\.[0-9a-f]{8}\.tmp")


class DirDestination:
    """Writes each delivery as one file (or one body+meta pair) in a directory."""

    def __init__(self, destination_settings: settings.DirDestinationSettings) -> None:
        self._settings = destination_settings

    async def __aenter__(self) -> DirDestination:
        await self.open()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the directory if needed, check it is writable, remove stale temp files."""
        path = self._settings.path
        removed = await asyncio.to_thread(prepare_directory, path)
        log.info("spool_ready", path=str(path), format=str(self._settings.format), stale=removed)

    async def deliver(self, delivery: models.Delivery) -> models.Outcome:
        if not _SAFE_EVENT_ID.fullmatch(delivery.event_id):
            return models.Reject(reason="the event id cannot be used in a file name")
        try:
            name = await asyncio.to_thread(write_event, self._settings, delivery)
        except OSError as exc:
            reason = f"cannot write to {self._settings.path}: {exc.strerror or exc}"
            log.warning("spool_write_failed", path=str(self._settings.path), error=reason)
            return models.Nack(reason=reason)
        log.info("event_written", file=name)
        return models.Ack()

    async def close(self) -> None:
        """Nothing to release: every write closes its own files."""


def file_stem(delivery: models.Delivery) -> str:
    """`<received_at>-<event id>`: sorts by receive time, then by the time-ordered id."""
    received = delivery.received_at.astimezone(datetime.UTC)
    return f"{received.strftime(_NAME_TIME_FORMAT)}-{delivery.event_id}"


def write_event(destination: settings.DirDestinationSettings, delivery: models.Delivery) -> str:
    """Write one event durably (blocking); returns the name of the file that marks it done."""
    directory = destination.path
    stem = file_stem(delivery)
    if destination.format is settings.DirFormat.RAW:
        # Body first, made durable, then the meta file whose presence completes the pair.
        write_atomically(directory, f"{stem}.body", delivery.body)
        fsync_directory(directory)
        meta = metadata(delivery) | {"body_file": f"{stem}.body"}
        name = f"{stem}.meta.json"
        write_atomically(directory, name, _json_bytes(meta))
    else:
        name = f"{stem}.json"
        write_atomically(directory, name, _json_bytes(envelope(delivery)))
    fsync_directory(directory)
    return name


def metadata(delivery: models.Delivery) -> dict[str, Any]:
    """Everything about the event except its body, as JSON-ready values."""
    received = delivery.received_at.astimezone(datetime.UTC)
    return {
        "version": ENVELOPE_VERSION,
        "event_id": delivery.event_id,
        "bucket": delivery.bucket,
        "output": delivery.output,
        "input_id": delivery.input_id,
        "method": delivery.method,
        "path": delivery.path,
        "query": delivery.query,
        "received_at": received.strftime(_ISO_TIME_FORMAT),
        "attempt": delivery.attempt,
        "replay": delivery.replay,
        "headers": [[name, value] for name, value in delivery.headers],
        "body_size": len(delivery.body),
    }


def envelope(delivery: models.Delivery) -> dict[str, Any]:
    """The json format: metadata plus the body, as text if it is UTF-8, else base64."""
    try:
        body, encoding = delivery.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(delivery.body).decode("ascii"), "base64"
    return metadata(delivery) | {"body_encoding": encoding, "body": body}


def decode_body(document: dict[str, Any]) -> bytes:
    """The body bytes of a json-format file (for readers written in Python, and tests)."""
    body = str(document["body"])
    if document["body_encoding"] == "base64":
        return base64.b64decode(body)
    return body.encode("utf-8")


def write_atomically(directory: pathlib.Path, name: str, data: bytes) -> None:
    """Write `data` under `name`: temp file in the same directory, fsync, rename over."""
    temp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def fsync_directory(directory: pathlib.Path) -> None:
    """Make renames in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_directory(path: pathlib.Path) -> int:
    """Create the spool directory if missing and delete our stale temp files (blocking).

    Returns how many were deleted. Raises ConfigError when the directory is unusable.
    """
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.ConfigError(
            f"cannot create the directory {path}: {exc.strerror or exc}"
        ) from None
    problem = directory_problem(path)
    if problem is not None:
        raise errors.ConfigError(problem)
    removed = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        fsync_directory(path)
    return removed


def directory_problem(path: pathlib.Path) -> str | None:
    """Why events could not be written to `path`, or None (blocking; creates nothing)."""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        writable = parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
        if not writable:
            return f"the directory {path} does not exist and cannot be created"
        return None
    if not path.is_dir():
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"cannot write to the directory {path}: permission denied"
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _json_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, ensure_ascii=False, indent=None) + "\n").encode("utf-8")
