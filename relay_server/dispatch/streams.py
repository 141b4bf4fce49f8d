"""Open agent streams per token: one leaked or copied token cannot hold every slot.

`grpc.max_connections` bounds streams server-wide; this bounds them per token key id
(`serve --grpc-max-streams-per-token`). A stream counts from authentication until it
ends, however it ends; the one past the limit is refused with RESOURCE_EXHAUSTED and a
message naming the key id and the limit, and agents retry with their usual backoff.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from relay_server import errors


class TooManyStreams(errors.RelayError):
    """This agent token already holds as many streams as it may."""


class StreamsPerToken:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def hold(self, key_id: str) -> Iterator[None]:
        """Count one stream of `key_id` for the duration; TooManyStreams past the limit."""
        if self._open[key_id] >= self._limit:
            raise TooManyStreams(
                f"token {key_id} already has {self._limit} open streams, its limit "
                "(relay-server serve --grpc-max-streams-per-token); close one or use "
                "another token"
            )
        self._open[key_id] += 1
        try:
            yield
        finally:
            self._open[key_id] -= 1
            if self._open[key_id] <= 0:
                del self._open[key_id]
