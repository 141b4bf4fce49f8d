"""JSON columns <-> domain objects: input auth, verification, response mode.

Secrets never go through here in clear: signing secrets are sealed separately
(`seal_secrets`), passwords and tokens are stored as bcrypt hashes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from relay_server import crypto, models


def dump_input_auth(auth: models.InputAuth | None) -> str | None:
    if auth is None:
        return None
    return json.dumps(
        {"kind": auth.kind.value, "username": auth.username, "secret_hash": auth.secret_hash}
    )


def load_input_auth(text: str | None) -> models.InputAuth | None:
    if not text:
        return None
    data = json.loads(text)
    return models.InputAuth(
        kind=models.InputAuthKind(data["kind"]),
        username=data.get("username", ""),
        secret_hash=data.get("secret_hash", ""),
    )


def dump_verification(verification: models.Verification | None) -> str | None:
    """The verification settings without the secrets (see seal_secrets)."""
    if verification is None:
        return None
    return json.dumps(
        {
            "kind": verification.kind.value,
            "header": verification.header,
            "encoding": verification.encoding,
            "prefix": verification.prefix,
            "tolerance_s": verification.tolerance_s,
        }
    )


def load_verification(text: str | None) -> models.Verification | None:
    """The settings; `secrets` stays empty until open_secrets fills it."""
    if not text:
        return None
    data: dict[str, Any] = json.loads(text)
    return models.Verification(
        kind=models.VerifyKind(data["kind"]),
        header=data.get("header", ""),
        encoding=data.get("encoding", "hex"),
        prefix=data.get("prefix", ""),
        tolerance_s=int(data.get("tolerance_s", 300)),
    )


def secrets_aad(input_id: str) -> bytes:
    return f"input:{input_id}:verify".encode()


def seal_secrets(keyring: crypto.KeyRing, input_id: str, secrets: tuple[str, ...]) -> bytes:
    return keyring.seal(json.dumps(list(secrets)).encode(), secrets_aad(input_id))


def open_secrets(keyring: crypto.KeyRing, input_id: str, sealed: bytes) -> tuple[str, ...]:
    return tuple(json.loads(keyring.open(sealed, secrets_aad(input_id))))


def dump_response(mode: models.ResponseMode) -> str | None:
    if mode == models.ResponseMode():
        return None
    return json.dumps(
        {
            "kind": mode.kind.value,
            "status": mode.status,
            "headers": [list(pair) for pair in mode.headers],
            "body": base64.b64encode(mode.body).decode(),
            "timeout_ms": mode.timeout_ms,
            "fallback": mode.fallback,
        }
    )


def load_response(text: str | None) -> models.ResponseMode:
    if not text:
        return models.ResponseMode()
    data: dict[str, Any] = json.loads(text)
    return models.ResponseMode(
        kind=models.ResponseKind(data["kind"]),
        status=int(data["status"]),
        headers=tuple((str(k), str(v)) for k, v in data["headers"]),
        body=base64.b64decode(data["body"]),
        timeout_ms=int(data["timeout_ms"]),
        fallback=bool(data["fallback"]),
    )
