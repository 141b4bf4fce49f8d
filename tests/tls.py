"""Throw-away certificate authorities and certificates for the TLS tests (trustme).

Files are written the way an operator would install them: certificates readable,
private keys mode 0600 (the server refuses keys other users can read).
"""

from __future__ import annotations

import os
import pathlib
import ssl
from dataclasses import dataclass

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Issued:
    """A certificate chain and its private key, as PEM files."""

    cert: pathlib.Path
    key: pathlib.Path

    def sha256(self) -> str:
        """SHA-256 of the leaf certificate's DER, as `relay-server token bind` stores it."""
        leaf = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return leaf.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class Authority:
    """A CA written to `<folder>/<name>-ca.pem` that issues certificates into `folder`."""

    ca: trustme.CA
    folder: pathlib.Path
    name: str

    @classmethod
    def create(cls, folder: pathlib.Path, name: str = "test") -> Authority:
        authority = cls(ca=trustme.CA(), folder=folder, name=name)
        authority.ca.cert_pem.write_to_path(str(authority.ca_file))
        return authority

    @property
    def ca_file(self) -> pathlib.Path:
        return self.folder / f"{self.name}-ca.pem"

    def issue(self, stem: str, *identities: str) -> Issued:
        """A leaf certificate (server and client use) for `identities` (default: `stem`)."""
        leaf = self.ca.issue_cert(*(identities or (stem,)))
        cert = self.folder / f"{stem}.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key = self.folder / f"{stem}.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(leaf.private_key_pem.bytes())
        return Issued(cert=cert, key=key)

    def server(self) -> Issued:
        """A server certificate for 127.0.0.1 and localhost."""
        return self.issue(f"{self.name}-server", *SERVER_NAMES)

    def client_context(self) -> ssl.SSLContext:
        """What an HTTPS client that trusts only this CA uses."""
        return ssl.create_default_context(cafile=str(self.ca_file))
