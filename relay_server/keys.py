"""Key rotation end to end, and a running server that follows the key file.

Order matters: a server must hold a key before any record it reads is sealed with it.
So `rotate` (1) adds the new primary to the key file, (2) waits `reload_wait_s` while
running servers re-read the file (they check it every `RELOAD_INTERVAL_S`, or at once on
SIGHUP), and only then (3) re-encrypts the stored records. Until a server has reloaded it
keeps sealing with the old primary, which stays in the file: records it writes meanwhile
are simply re-encrypted later (`rotate --resume` finishes any leftover). A key leaves the
file only through `remove`, which refuses while any record still needs it.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from dataclasses import dataclass

import structlog

from relay_server import crypto, errors, reaper
from relay_server.store import rekey, sql

log = structlog.get_logger(__name__)

RELOAD_INTERVAL_S = 2.0  # how often a running server checks the key file for changes
DEFAULT_RELOAD_WAIT_S = 5.0  # what `rotate` gives running servers before re-encrypting


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyUsage:
    key_id: str
    primary: bool
    in_file: bool  # False: records name a key the file does not hold (they cannot be opened)
    records: dict[str, int]  # column -> records sealed with this key

    @property
    def total(self) -> int:
        return sum(self.records.values())


async def usage(store: sql.SqlStore, ring: crypto.KeyRing) -> list[KeyUsage]:
    """Every key of the file and every key id found in stored records, primary first."""
    async with store.db.read() as conn:
        counts = await rekey.count_by_key(conn)
    order = [ring.primary_id, *(k for k in ring.keys if k != ring.primary_id)]
    order += sorted(k for k in counts if k not in ring.keys)
    return [
        KeyUsage(
            key_id=k,
            primary=k == ring.primary_id,
            in_file=k in ring.keys,
            records=counts.get(k, {}),
        )
        for k in order
    ]


async def wait_for_reload(path: pathlib.Path, reload_wait_s: float) -> float:
    """Sleep until the key file has been unchanged for `reload_wait_s`; returns the wait."""
    remaining = path.stat().st_mtime + reload_wait_s - time.time()
    if remaining > 0:
        await asyncio.sleep(remaining)
    return max(remaining, 0.0)


async def remove(store: sql.SqlStore, path: pathlib.Path, key_id: str) -> crypto.KeyRing:
    """Drop `key_id` from the key file; refuses the primary and a key records still use."""
    with crypto.key_file_lock(path):
        ring = crypto.load_key_file(path)
        if key_id not in ring.keys:
            raise errors.NotFound(f"the key file holds no key {key_id!r}")
        if key_id == ring.primary_id:
            raise errors.Conflict(f"key {key_id!r} is the primary (it seals new records)")
        in_use = next((u.total for u in await usage(store, ring) if u.key_id == key_id), 0)
        if in_use:
            raise errors.Conflict(
                f"{in_use} stored record(s) are still sealed with key {key_id!r}; "
                "re-encrypt them first: relay-server keys rotate --resume"
            )
        smaller = crypto.KeyRing(
            primary_id=ring.primary_id, keys={k: v for k, v in ring.keys.items() if k != key_id}
        )
        crypto.write_key_file(path, smaller)
    return smaller


def _signature(path: pathlib.Path) -> tuple[int, int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns, found.st_size


class KeyReloader(reaper.Periodic):
    """Re-reads the key file into the store when it changes (polled, or `check(force=True)`).

    A file that cannot be read, or that changes the bytes of a key id the server already
    holds (records sealed with it would no longer open), is refused: the server keeps its
    current keys and logs why.
    """

    def __init__(
        self, store: sql.SqlStore, path: pathlib.Path, interval_s: float = RELOAD_INTERVAL_S
    ) -> None:
        super().__init__(store, interval_s)
        self._path = path
        self._seen = _signature(path)

    async def once(self) -> int:
        return int(self.check())

    def check(self, *, force: bool = False) -> bool:
        """Reload if the file changed (or `force`); True if the server's keys changed."""
        seen = _signature(self._path)
        if seen == self._seen and not force:
            return False
        self._seen = seen
        try:
            ring = crypto.load_key_file(self._path)
        except errors.ConfigError as exc:
            log.error("keys_reload_failed", error=exc.message)
            return False
        current = self._store.keyring
        altered = sorted(
            k for k in ring.keys if k in current.keys and ring.keys[k] != current.keys[k]
        )
        if altered:
            log.error(
                "keys_reload_failed",
                error="the file changes the bytes of keys already in use; keeping the current keys",
                key_ids=altered,
            )
            return False
        self._store.use_keyring(ring)
        log.info(
            "keys_reloaded",
            primary=ring.primary_id,
            key_ids=sorted(ring.keys),
            removed=sorted(set(current.keys) - set(ring.keys)),
        )
        return True
