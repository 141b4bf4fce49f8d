"""Time-ordered identifiers (UUIDv7), so "oldest first" is an index scan."""

from __future__ import annotations

import uuid

import uuid6


def new_id() -> str:
    """A UUIDv7 as its canonical 36-character string."""
    return str(uuid6.uuid7())


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36
