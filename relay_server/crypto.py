"""AES-256-GCM sealing of payloads at rest.

A sealed record is ``b"\\x01" | len(key_id) | key_id | nonce(12) | ciphertext+tag``. The
key id in front lets keys rotate: the ring opens any record whose key it holds and seals
new ones with its primary key. The associated data binds a record to its row (event id
and field name), so a ciphertext copied to another row does not open.

A key file holds one key per line as ``<key_id>:<base64 of 32 bytes>``; the first line is
the primary. A file with a bare base64 key (no id) is read as key id ``k1``.
"""

from __future__ import annotations

import base64
import binascii
import os
import pathlib
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay_server import errors

FORMAT_VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
DEFAULT_KEY_ID = "k1"
MAKE_KEY_HINT = "create one with: relay-server keys generate --key-file PATH"


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The AES-256 keys this server can open, and the one it seals with."""

    primary_id: str
    keys: Mapping[str, bytes]
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.primary_id not in self.keys:
            raise errors.ConfigError(f"primary key {self.primary_id!r} is not in the key ring")
        for key_id, key in self.keys.items():
            _check_key(key_id, key)
            self._ciphers[key_id] = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        key_id = self.primary_id.encode()
        sealed = self._ciphers[self.primary_id].encrypt(nonce, plaintext, aad)
        return bytes((FORMAT_VERSION, len(key_id))) + key_id + nonce + sealed

    def open(self, record: bytes, aad: bytes) -> bytes:
        key_id, nonce, sealed = _split(record)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise errors.UnknownKeyError(f"record sealed with unknown key {key_id!r}")
        try:
            return cipher.decrypt(nonce, sealed, aad)
        except InvalidTag as exc:
            raise errors.CryptoError() from exc

    @staticmethod
    def key_id_of(record: bytes) -> str:
        return _split(record)[0]


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
