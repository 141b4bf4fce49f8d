"""TLS from PEM files: the HTTPS listener, the gRPC key, and client certificates bound to
agent tokens.

Private keys readable by other users are refused, like the AES key file: a leaked TLS key
lets anyone impersonate the relay. Group read stays allowed, for the common
`root:ssl-cert 0640` layout.

A token bound to a client certificate (`relay-server token bind`) holds the SHA-256 of the
certificate's DER encoding; the servicer compares it, in constant time, with the
certificate the agent presented in the mTLS handshake (`auth_context()["x509_pem_cert"]`).
"""

from __future__ import annotations

import hmac
import pathlib
import ssl
import stat
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from relay_server import errors, models

PEER_CERT_KEY = "x509_pem_cert"  # grpc auth_context(): the client's certificate, PEM


def read_private_key(path: pathlib.Path) -> bytes:
    """A private key file's bytes, refusing one that other users can read."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise errors.ConfigError(f"TLS key {path} cannot be read: {exc.strerror}") from exc
    if mode & stat.S_IRWXO:
        raise errors.ConfigError(
            f"TLS key {path} is readable by other users; run: chmod 600 {path}"
        )
    return data


def read_certificate(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise errors.ConfigError(f"TLS certificate {path} cannot be read: {exc.strerror}") from exc


def https_context(cert: pathlib.Path | None, key: pathlib.Path | None) -> ssl.SSLContext | None:
    """The webhook listener's context: TLS 1.2 or newer, Python's safe defaults; None: HTTP."""
    if cert is None or key is None:
        return None
    read_private_key(key)  # the permission check; ssl reads the file itself
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(
            f"cannot use {cert} with {key} for HTTPS: {exc.strerror or exc} (PEM certificate "
            "chain, then the matching unencrypted private key)"
        ) from exc
    return context


def fingerprint(pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER encoding, lower-case hex."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise errors.ConfigError(f"not a PEM certificate: {exc}") from exc
    return certificate.fingerprint(hashes.SHA256()).hex()


def check_binding(token: models.Token, auth_context: Mapping[str, Iterable[bytes]]) -> None:
    """PermissionDenied unless the connection's client certificate is the token's own."""
    if token.client_cert_sha256 is None:
        return
    pems = list(auth_context.get(PEER_CERT_KEY, ()))
    if not pems:
        raise errors.PermissionDenied(
            f"token {token.key_id} is bound to a client certificate and this connection "
            "presented none"
        )
    if not hmac.compare_digest(fingerprint(pems[0]), token.client_cert_sha256):
        raise errors.PermissionDenied(
            f"token {token.key_id} is bound to another client certificate than the one "
            "this connection presented"
        )
