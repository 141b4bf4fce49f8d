"""Agent tokens: `<key_id>.<secret>`, the secret stored only as a bcrypt hash.

bcrypt costs ~0.2 s by design, so a verified token is remembered for a short TTL. The
cache is keyed by an HMAC (with a per-process random key) of the presented token and the
stored hash, so it holds no secret, and a revoked or re-hashed token misses it. The
token row is read on every verification: revocation takes effect at once.

Rotation keeps the old secret's hash beside the new one until a grace period ends; both
open the token meanwhile. The store hands out only the hashes valid at the moment of the
read, so a cached check of an expired secret can never be reused.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import time

import bcrypt
import structlog

from relay_server import errors, models
from relay_server.store import sql

log = structlog.get_logger(__name__)

KEY_ID_PREFIX = "shk_"
KEY_ID_SHAPE = re.compile(r"shk_[0-9a-f]{16}")
BCRYPT_ROUNDS = 12
BCRYPT_MAX_BYTES = 72  # bcrypt reads no further, and refuses longer secrets
CACHE_TTL_S = 60.0
CACHE_MAX = 10_000


def new_token() -> tuple[str, str]:
    """A fresh (key_id, secret): 64 bits of id, 256 bits of secret."""
    return KEY_ID_PREFIX + secrets.token_hex(8), secrets.token_urlsafe(32)


def hash_secret(secret: str, rounds: int = BCRYPT_ROUNDS) -> str:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()


def presented_key_id(authorization: str) -> str:
    """The key id in an `authorization: Bearer <key_id>.<secret>` value, safe to record:
    `(malformed)` unless it has the shape of a key id, so no secret pasted in the wrong
    place ever reaches a log or the audit log."""
    key_id = authorization.partition(" ")[2].strip().partition(".")[0]
    return key_id if KEY_ID_SHAPE.fullmatch(key_id) else "(malformed)"


def parse_token(text: str) -> tuple[str, str]:
    key_id, sep, secret = text.strip().partition(".")
    if not sep or not key_id or not secret or len(text) > 200:
        raise errors.AuthError("malformed token: expected <key_id>.<secret>")
    return key_id, secret


class TokenVerifier:
    def __init__(self, store: sql.SqlStore, *, ttl_s: float = CACHE_TTL_S) -> None:
        self._store = store
        self._verified = VerifiedCache(ttl_s=ttl_s)

    async def verify(self, presented: str) -> models.Token:
        """The token's record if `presented` is valid and not revoked; AuthError otherwise.

        During a rotation's grace period either secret is valid: the row lists the hashes
        valid right now, so a rotated-away secret stops at the end of its grace even if
        its check is cached.
        """
        key_id, secret = parse_token(presented)
        found = await self._store.token(key_id)
        if found is None:
            shown = key_id if KEY_ID_SHAPE.fullmatch(key_id) else "(malformed)"
            raise errors.AuthError(f"unknown key id {shown}")
        token, hashes = found
        if token.revoked_at is not None:
            raise errors.AuthError(f"token {key_id} was revoked")
        for index, secret_hash in enumerate(hashes):
            if await self._verified.check(presented, secret, secret_hash):
                if index > 0:
                    log.info(
                        "token_previous_secret_used",
                        key_id=key_id,
                        valid_until=token.previous_valid_until,
                    )
                return token
        raise errors.AuthError(f"wrong secret for key id {key_id}")


class VerifiedCache:
    """bcrypt checks remembered for a short TTL.

    Keyed by an HMAC (per-process random key) of what was presented and the stored hash:
    it holds no secret, and a changed or removed hash misses it.
    """

    def __init__(self, *, ttl_s: float = CACHE_TTL_S, max_entries: int = CACHE_MAX) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._mac_key = os.urandom(32)
        self._verified: dict[bytes, float] = {}

    async def check(self, presented: str, secret: str, secret_hash: str) -> bool:
        """Whether `secret` matches the bcrypt `secret_hash`; `presented` keys the cache."""
        digest = hmac.new(
            self._mac_key, f"{presented}\0{secret_hash}".encode(), hashlib.sha256
        ).digest()
        now = time.monotonic()
        if self._verified.get(digest, 0.0) > now:
            return True
        if len(secret.encode()) > BCRYPT_MAX_BYTES:  # bcrypt raises: no stored secret is longer
            return False
        matches = await asyncio.to_thread(bcrypt.checkpw, secret.encode(), secret_hash.encode())
        if matches:
            self._remember(digest, now)
        return matches

    def _remember(self, digest: bytes, now: float) -> None:
        if len(self._verified) >= self._max_entries:
            self._verified = {k: t for k, t in self._verified.items() if t > now}
            if len(self._verified) >= self._max_entries:
                self._verified.clear()
        self._verified[digest] = now + self._ttl_s
