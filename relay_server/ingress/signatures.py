"""Provider webhook signatures, checked over the raw body bytes in constant time.

A relay that stores whatever reaches a public URL stores forgeries too; checking the
provider's own signature at the door keeps them out. Each scheme is a plain function of
(settings, headers, body, now), so the whole matrix is tested without a server.

Several secrets may be configured (rotation): any one matching is enough. Timestamped
schemes (Stripe, Slack, Standard Webhooks) refuse a timestamp further than the tolerance
from now, in the past or the future, and name a `models.Nonce`: the hash of what was
signed. The store refuses a second webhook with the same nonce within the tolerance as a replay (in
the transaction that stores the first, see store.queue).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from relay_server import errors, models

STANDARD_SECRET_PREFIX = "whsec_"
TIMESTAMPED = (models.VerifyKind.STRIPE, models.VerifyKind.SLACK, models.VerifyKind.STANDARD)
_TIMESTAMP = re.compile(r"^\d{1,12}$")

Headers = Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy, multidict)


class SignatureRefused(errors.AuthError):
    """The webhook's signature is missing, wrong, or outside the time tolerance."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"signature refused: {reason}")
        self.reason = reason  # a stable snake_case word for logs: never a secret


@dataclass(frozen=True, slots=True)
class _Signed:
    """What one request claims: the bytes signed, the signatures presented, its timestamp."""

    message: bytes
    presented: tuple[bytes, ...]
    timestamp: int | None = None


def verify(
    verification: models.Verification, headers: Headers, body: bytes, now_s: float
) -> models.Nonce | None:
    """Check the request against `verification`; SignatureRefused if it fails.

    Returns the request's nonce for timestamped schemes, None for the others.
    """
    scheme = _SCHEMES[verification.kind]
    signed = scheme.parse(verification, headers, body)
    keys = [scheme.key(secret) for secret in verification.secrets]
    expected = [scheme.sign(key, signed.message) for key in keys if key]
    if not _any_match(expected, signed.presented):
        raise SignatureRefused("bad_signature")
    if signed.timestamp is None:
        return None
    _check_time(signed.timestamp, verification.tolerance_s, now_s)
    digest = hashlib.sha256(verification.kind.value.encode() + b"\0" + signed.message)
    return models.Nonce(
        value=digest.hexdigest(),
        expires_at_ms=(signed.timestamp + verification.tolerance_s + 1) * 1000,
    )


def check_secret(kind: models.VerifyKind, secret: str) -> None:
    """ValueError with a clear message if `secret` cannot be a `kind` signing secret."""
    if not secret or secret != secret.strip():
        raise ValueError("a signing secret must be non-empty, without surrounding whitespace")
    if kind is models.VerifyKind.STANDARD:
        try:
            standard_key(secret)
        except ValueError as exc:
            raise ValueError(
                f"a Standard Webhooks secret is {STANDARD_SECRET_PREFIX}<base64>: {exc}"
            ) from exc


def describe(verification: models.Verification | None) -> str:
    """What an input checks, for people and audit entries: never a secret."""
    if verification is None:
        return "none"
    text = verification.kind.value
    if verification.kind is models.VerifyKind.HMAC:
        prefix = f", prefix {verification.prefix}" if verification.prefix else ""
        text += f" ({verification.header}, {verification.encoding}{prefix})"
    if verification.kind in TIMESTAMPED:
        text += f", tolerance {verification.tolerance_s}s"
    if count := len(verification.secrets):
        text += f", {count} secret{'s' if count > 1 else ''}"
    return text


def standard_key(secret: str) -> bytes:
    """The HMAC key inside a `whsec_<base64>` secret."""
    if not secret.startswith(STANDARD_SECRET_PREFIX):
        raise ValueError(f"it does not start with {STANDARD_SECRET_PREFIX}")
    key = _unbase64(secret.removeprefix(STANDARD_SECRET_PREFIX))
    if not key:
        raise ValueError("the part after the prefix is not base64 or is empty")
    return key


# ---- the schemes -------------------------------------------------------------------------


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _utf8_key(secret: str) -> bytes:
    return secret.encode()


def _standard_key_or_nothing(secret: str) -> bytes:
    # A stored secret was checked by the CLI; one that is not (edited database) matches nothing.
    try:
        return standard_key(secret)
    except ValueError:
        return b""


def _header(headers: Headers, name: str) -> str:
    value = headers.get(name, "").strip()
    if not value:
        raise SignatureRefused("missing_signature")
    return value


def _timestamp(text: str) -> int:
    if not _TIMESTAMP.match(text):
        raise SignatureRefused("malformed_timestamp")
    return int(text)


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


def _unbase64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _github(v: models.Verification, headers: Headers, body: bytes) -> _Signed:
    value = _header(headers, "X-Hub-Signature-256")
    return _Signed(body, (_unhex(value.removeprefix("sha256=")),) if value[:7] == "sha256=" else ())


def _shopify(v: models.Verification, headers: Headers, body: bytes) -> _Signed:
    return _Signed(body, (_unbase64(_header(headers, "X-Shopify-Hmac-Sha256")),))


def _slack(v: models.Verification, headers: Headers, body: bytes) -> _Signed:
    value = _header(headers, "X-Slack-Signature")
    timestamp = _timestamp(_header(headers, "X-Slack-Request-Timestamp"))
    presented = (_unhex(value.removeprefix("v0=")),) if value[:3] == "v0=" else ()
    return _Signed(f"v0:{timestamp}:".encode() + body, presented, timestamp)


def _stripe(v: models.Verification, headers: Headers, body: bytes) -> _Signed:
    """`t=<ts>,v1=<hex>[,v1=<hex>...]`: any v1 may match (Stripe sends one per secret)."""
    items = [item.partition("=") for item in _header(headers, "Stripe-Signature").split(",")]
    stamps = [value.strip() for name, _, value in items if name.strip() == "t"]
    if len(stamps) != 1:
        raise SignatureRefused("malformed_timestamp")
    timestamp = _timestamp(stamps[0])
    presented = tuple(_unhex(value.strip()) for name, _, value in items if name.strip() == "v1")
    return _Signed(f"{timestamp}.".encode() + body, presented, timestamp)


def _standard(v: models.Verification, headers: Headers, body: bytes) -> _Signed:
    """webhook-id/-timestamp/-signature; the signature header is `v1,<b64> v1,<b64> ...`."""
    webhook_id = _header(headers, "webhook-id")
    timestamp = _timestamp(_header(headers, "webhook-timestamp"))
    presented = tuple(
        _unbase64(signature)
        for version, _, signature in (
            item.partition(",") for item in _header(headers, "webhook-signature").split()
        )
        if version == "v1"
    )
    return _Signed(f"{webhook_id}.{timestamp}.".encode() + body, presented, timestamp)


def _generic(v: models.Verification, headers: Headers, body: bytes) -> _Signed:
    value = _header(headers, v.header)
    if not value.startswith(v.prefix):
        return _Signed(body, ())
    text = value.removeprefix(v.prefix)
    return _Signed(body, (_unbase64(text) if v.encoding == "base64" else _unhex(text),))


@dataclass(frozen=True, slots=True)
class _Scheme:
    parse: Callable[[models.Verification, Headers, bytes], _Signed]
    key: Callable[[str], bytes] = _utf8_key
    sign: Callable[[bytes, bytes], bytes] = _hmac_sha256


_SCHEMES: dict[models.VerifyKind, _Scheme] = {
    models.VerifyKind.GITHUB: _Scheme(_github),
    models.VerifyKind.SHOPIFY: _Scheme(_shopify),
    models.VerifyKind.SLACK: _Scheme(_slack),
    models.VerifyKind.STRIPE: _Scheme(_stripe),
    models.VerifyKind.STANDARD: _Scheme(_standard, key=_standard_key_or_nothing),
    models.VerifyKind.HMAC: _Scheme(_generic),
}


def _any_match(expected: Iterable[bytes], presented: tuple[bytes, ...]) -> bool:
    """Does any presented signature equal any expected one? Each comparison constant-time."""
    found = False
    for mine in expected:
        for theirs in presented:
            found |= hmac.compare_digest(mine, theirs)
    return found


def _check_time(timestamp: int, tolerance_s: int, now_s: float) -> None:
    if timestamp < now_s - tolerance_s:
        raise SignatureRefused("stale_timestamp")
    if timestamp > now_s + tolerance_s:
        raise SignatureRefused("future_timestamp")
