"""AES-256-GCM sealing of payloads at rest.

A sealed record is ``b"\\x01" | len(key_id) | key_id | nonce(12) | ciphertext+tag``. The
key id in front lets keys rotate: the ring opens any record whose key it holds and seals
new ones with its primary key. The associated data binds a record to its row (event id
and field name), so a ciphertext copied to another row does not open.

A key file holds one key per line as ``<key_id>:<base64 of 32 bytes>``; the first line is
the primary. A file with a bare base64 key (no id) is read as key id ``k1``. Rotation
(`add_primary_key`, `remove_key`) rewrites the file atomically (a temporary file, fsync,
rename) under a lock file, so a running server that re-reads it never sees half a file and
two rotations cannot drop each other's key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import os
import pathlib
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay_server import errors

FORMAT_VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
DEFAULT_KEY_ID = "k1"
MAKE_KEY_HINT = "create one with: relay-server keys generate --key-file PATH"


class NonceSource:
    """Random 96-bit AES-GCM nonces, cut from kernel randomness fetched 4 KiB at a time.

    A webhook is sealed in three fields; one getrandom(2) call per nonce cost more than
    the encryption itself under load (a syscall is where a busy VM deschedules the loop).
    The bytes are the same os.urandom output, handed out once each: a lock guards the
    position, and a forked child starts from fresh bytes, never its parent's buffer.
    """

    REFILL_BYTES = 4096

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._position = 0

    def take(self) -> bytes:
        with self._lock:
            start = self._position
            if start + NONCE_BYTES > len(self._buffer):
                self._buffer, start = os.urandom(self.REFILL_BYTES), 0
            self._position = start + NONCE_BYTES
            return self._buffer[start : start + NONCE_BYTES]


_nonces = NonceSource()


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The AES-256 keys this server can open, and the one it seals with."""

    primary_id: str
    keys: Mapping[str, bytes]
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, repr=False, compare=False)
    _prefix: list[bytes] = field(init=False, default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.primary_id not in self.keys:
            raise errors.ConfigError(f"primary key {self.primary_id!r} is not in the key ring")
        for key_id, key in self.keys.items():
            _check_key(key_id, key)
            self._ciphers[key_id] = AESGCM(key)
        self._prefix.append(record_prefix(self.primary_id))  # sealing runs per webhook field

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = _nonces.take()
        sealed = self._ciphers[self.primary_id].encrypt(nonce, plaintext, aad)
        return b"".join((self._prefix[0], nonce, sealed))

    def seal_chunks(
        self, plaintext: bytes, aad: bytes, chunk_bytes: int = 1024 * 1024
    ) -> Iterator[bytes]:
        """The record `seal` makes, in pieces of `chunk_bytes` or so, to write a large
        plaintext to a file without a sealed copy of all of it in memory."""
        nonce = _nonces.take()
        key = self.keys[self.primary_id]
        encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(aad)
        yield self._prefix[0] + nonce
        view = memoryview(plaintext)
        for start in range(0, len(view), chunk_bytes):
            yield encryptor.update(view[start : start + chunk_bytes])
        yield encryptor.finalize() + encryptor.tag

    def open(self, record: bytes, aad: bytes) -> bytes:
        key_id, nonce, sealed = _split(record)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise errors.UnknownKeyError(f"record sealed with unknown key {key_id!r}")
        try:
            return cipher.decrypt(nonce, sealed, aad)
        except InvalidTag as exc:
            raise errors.CryptoError(
                f"a record sealed with key {key_id!r} does not open: it was tampered with "
                "or moved from another row (its associated data differs)"
            ) from exc

    @staticmethod
    def key_id_of(record: bytes) -> str:
        return _split(record)[0]

    def is_sealed_with_primary(self, record: bytes) -> bool:
        return record.startswith(self._prefix[0])


def record_prefix(key_id: str) -> bytes:
    """The first bytes of every record sealed with `key_id` (format version, id length, id)."""
    encoded = key_id.encode()
    return bytes((FORMAT_VERSION, len(encoded))) + encoded


def _split(record: bytes) -> tuple[str, bytes, bytes]:
    if len(record) < 2 or record[0] != FORMAT_VERSION:
        raise errors.CryptoError("not a sealed record (unknown format)")
    id_len = record[1]
    start = 2 + id_len
    if len(record) < start + NONCE_BYTES + 16:
        raise errors.CryptoError("sealed record is truncated")
    key_id = record[2:start].decode("ascii", "replace")
    return key_id, record[start : start + NONCE_BYTES], record[start + NONCE_BYTES :]


def _check_key(key_id: str, key: bytes) -> None:
    if not key_id or len(key_id) > 32 or not key_id.isascii() or ":" in key_id:
        raise errors.ConfigError(f"invalid key id {key_id!r}: 1-32 ASCII characters, no ':'")
    if len(key) != KEY_BYTES:
        raise errors.ConfigError(
            f"key {key_id!r} is {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}"
        )


def generate_key_line(key_id: str = DEFAULT_KEY_ID) -> str:
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"


def parse_key_file(text: str, source: str = "key file") -> KeyRing:
    keys: dict[str, bytes] = {}
    primary = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, _, encoded = line.rpartition(":")
        key_id = key_id or DEFAULT_KEY_ID
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise errors.ConfigError(f"{source} line {number}: not base64") from exc
        _check_key(key_id, key)
        if key_id in keys:
            raise errors.ConfigError(f"{source} line {number}: key id {key_id!r} repeated")
        keys[key_id] = key
        primary = primary or key_id
    if primary is None:
        raise errors.ConfigError(f"{source} holds no key; {MAKE_KEY_HINT}")
    return KeyRing(primary_id=primary, keys=keys)


def load_key_file(path: pathlib.Path) -> KeyRing:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError as exc:
        raise errors.ConfigError(f"key file {path} does not exist; {MAKE_KEY_HINT}") from exc
    except OSError as exc:
        raise errors.ConfigError(f"key file {path} cannot be read: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise errors.ConfigError(
            f"key file {path} is readable by other users; run: chmod 600 {path}"
        )
    return parse_key_file(text, source=f"key file {path}")


def write_new_key_file(path: pathlib.Path) -> None:
    """Create a key file with one fresh key, mode 0600, refusing to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(generate_key_line() + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def format_key_file(ring: KeyRing) -> str:
    """The key file text for `ring`: the primary first, then the others in ring order."""
    order = [ring.primary_id, *(k for k in ring.keys if k != ring.primary_id)]
    return "".join(f"{k}:{base64.b64encode(ring.keys[k]).decode()}\n" for k in order)


def next_key_id(existing: Mapping[str, bytes]) -> str:
    """`k<N+1>` where N is the highest number among the `k<N>` ids in use."""
    numbers = [int(m.group(1)) for k in existing if (m := re.fullmatch(r"k(\d+)", k))]
    return f"k{max(numbers, default=0) + 1}"


@contextlib.contextmanager
def key_file_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold `<key file>.lock` exclusively; ConfigError at once if another rotation holds it."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise errors.ConfigError(
                f"another key rotation is running (it holds {lock_path}); wait for it to end"
            ) from exc
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_key_file(path: pathlib.Path, ring: KeyRing) -> None:
    """Replace the key file atomically: a 0600 temporary file, fsync, rename, fsync folder.

    The new file keeps the old one's owner, so a rotation run as root does not lock the
    server's own user out of its keys.
    """
    owner = path.stat()
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, owner.st_uid, owner.st_gid)
        with os.fdopen(fd, "w") as handle:
            handle.write(format_key_file(ring))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def add_primary_key(path: pathlib.Path) -> KeyRing:
    """Add a fresh AES-256 key to the key file as its primary; the old keys stay.

    Call it under `key_file_lock`.
    """
    ring = load_key_file(path)
    key_id = next_key_id(ring.keys)
    rotated = KeyRing(primary_id=key_id, keys={key_id: secrets.token_bytes(KEY_BYTES), **ring.keys})
    write_key_file(path, rotated)
    return rotated
