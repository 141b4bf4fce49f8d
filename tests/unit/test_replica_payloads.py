"""Notification payloads between replicas stay under PostgreSQL's 8000-byte limit."""

from __future__ import annotations

import uuid

from relay_server.store import replicas


def test_many_outputs_are_split_into_payloads_under_the_limit() -> None:
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    found = list(replicas.payloads(ids + ids[:10]))  # repeats are sent once
    assert len(found) > 1
    assert all(len(p.encode()) < 8000 for p in found)
    heard: list[str] = []
    for payload in found:
        origin, output_ids = replicas.parse(payload)
        assert origin == replicas.ORIGIN
        heard += output_ids
    assert sorted(heard) == sorted(ids)


def test_no_outputs_no_payload() -> None:
    assert list(replicas.payloads([])) == []
