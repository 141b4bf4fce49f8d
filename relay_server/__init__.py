"""Stowhook relay server: ingress, durable encrypted queue, agent streams, admin CLI."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
