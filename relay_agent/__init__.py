"""Stowhook relay agent: receives stored webhooks from a Stowhook server over one
outbound gRPC stream and hands them to an internal destination."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
