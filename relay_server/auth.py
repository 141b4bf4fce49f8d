"""Agent tokens: `<key_id>.<secret>`, the secret stored only as a bcrypt hash.

bcrypt costs ~0.2 s by design, so a verified token is remembered for a short TTL. The
cache is keyed by an HMAC (with a per-process random key) of the presented token and the
stored hash, so it holds no secret, and a revoked or re-hashed token misses it. The
token row is read on every verification: revocation takes effect at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time

import bcrypt

from relay_server import errors, models
from relay_server.store import sql

KEY_ID_PREFIX = "shk_"
BCRYPT_ROUNDS = 12
CACHE_TTL_S = 60.0
CACHE_MAX = 10_000


def new_token() -> tuple[str, str]:
    """A fresh (key_id, secret): 64 bits of id, 256 bits of secret."""
    return KEY_ID_PREFIX + secrets.token_hex(8), secrets.token_urlsafe(32)


def hash_secret(secret: str, rounds: int = BCRYPT_ROUNDS) -> str:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()


def parse_token(text: str) -> tuple[str, str]:
    key_id, sep, secret = text.strip().partition(".")
    if not sep or not key_id or not secret or len(text) > 200:
        raise errors.AuthError("malformed token: expected <key_id>.<secret>")
    return key_id, secret


class TokenVerifier:
    def __init__(self, store: sql.SqlStore, *, ttl_s: float = CACHE_TTL_S) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._mac_key = os.urandom(32)
        self._verified: dict[bytes, float] = {}

    async def verify(self, presented: str) -> models.Token:
        """The token's record if `presented` is valid and not revoked; AuthError otherwise."""
        key_id, secret = parse_token(presented)
        found = await self._store.token(key_id)
        if found is None:
            raise errors.AuthError(f"unknown key id {key_id}")
        token, secret_hash = found
        if token.revoked_at is not None:
            raise errors.AuthError(f"token {key_id} was revoked")
        digest = hmac.new(
            self._mac_key, f"{presented}\0{secret_hash}".encode(), hashlib.sha256
        ).digest()
        now = time.monotonic()
        if self._verified.get(digest, 0.0) > now:
            return token
        matches = await asyncio.to_thread(bcrypt.checkpw, secret.encode(), secret_hash.encode())
        if not matches:
            raise errors.AuthError(f"wrong secret for key id {key_id}")
        self._remember(digest, now)
        return token

    def _remember(self, digest: bytes, now: float) -> None:
        if len(self._verified) >= CACHE_MAX:
            self._verified = {k: t for k, t in self._verified.items() if t > now}
            if len(self._verified) >= CACHE_MAX:
                self._verified.clear()
        self._verified[digest] = now + self._ttl_s
