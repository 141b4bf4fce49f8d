"""Request rate limits: per input (`relay-server input limit`) and per source (`serve`).

Both are token buckets held in memory: a bucket holds up to `burst` tokens, refills at
`per_s` a second, and each request takes one. Over a limit the sender gets 429 with an
integer `Retry-After` (when the next token comes, at least 1 s), nothing is stored and the
body is not read; if the body has not fully arrived the connection is closed rather than
drained. The per-source check comes before the input lookup, so floods to made-up input
ids are limited too; the per-input check comes right after it.

A bucket that has refilled to full behaves exactly like a new one, so it is forgotten;
buckets are kept least recently used first and at most `MAX_TRACKED` per kind, so a flood
from many addresses costs bounded memory (past the cap the least recently seen sender
starts again with a full bucket). Sources are counted as `throttle.source_key` does:
the IPv4 address, or the IPv6 /64 a host usually owns. The counts are per process: with
several replicas each applies the limit on its own.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from relay_server import models, throttle
from relay_server.ingress import source

log = structlog.get_logger(__name__)

MAX_TRACKED = 10_000  # buckets (not full) kept per kind; the least recently used goes first
# A token counts as there when this close to 1: 0.2 s at 5/s must refill one whole token
# even though 0.2 * 5 is 0.9999999999999998 in floating point.
EPSILON = 1e-9

# throttle.source_key parses the address on every call; the per-source limit asks once per
# webhook, mostly about the same few senders. Bounded like the buckets themselves.
_source_key = functools.lru_cache(maxsize=MAX_TRACKED)(throttle.source_key)


@dataclass(slots=True, kw_only=True)
class TokenBucket:
    """Pure token-bucket arithmetic on a caller's monotonic clock."""

    limit: models.RateLimit
    tokens: float
    stamp: float  # when `tokens` was last brought up to date
    refused: int = 0  # refusals since the last request let through

    @classmethod
    def full(cls, limit: models.RateLimit, now: float) -> TokenBucket:
        return cls(limit=limit, tokens=float(limit.burst), stamp=now)

    def take(self, now: float) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be."""
        if now > self.stamp:
            refill = (now - self.stamp) * self.limit.per_s
            self.tokens = min(float(self.limit.burst), self.tokens + refill)
            self.stamp = now
        if self.tokens >= 1.0 - EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            self.refused = 0
            return 0.0
        self.refused += 1
        return (1.0 - self.tokens) / self.limit.per_s

    def full_at(self) -> float:
        """When the bucket is full again if nobody takes from it."""
        return self.stamp + (self.limit.burst - self.tokens) / self.limit.per_s


class Buckets:
    """Token buckets by key, least recently used first, at most `max_keys` of them."""

    def __init__(self, max_keys: int = MAX_TRACKED) -> None:
        self._max_keys = max_keys
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, limit: models.RateLimit, now: float) -> tuple[float, int]:
        """Take from the key's bucket (a changed limit starts afresh): the wait as
        `TokenBucket.take` gives it, and how many requests in a row it has refused."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit != limit:
            bucket = self._buckets[key] = TokenBucket.full(limit, now)
        self._buckets.move_to_end(key)
        wait = bucket.take(now)
        self._forget(now)
        return wait, bucket.refused

    def _forget(self, now: float) -> None:
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) <= self._max_keys and oldest.full_at() > now:
                return
            del self._buckets[key]


class RateLimiter:
    def __init__(
        self,
        per_source: models.RateLimit | None,
        trusted_proxies: tuple[source.Network, ...],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`per_source` None: no per-source limit."""
        self._per_source = per_source
        self._trusted = trusted_proxies
        self._clock = clock
        self.sources = Buckets()
        self.inputs = Buckets()

    def refuse_source(self, request: web.Request) -> web.Response | None:
        """429 if the sender is over the per-source limit, else None."""
        if self._per_source is None:
            return None
        sender = source.source_of(request, self._trusted)
        key = _source_key(sender)
        return self._check(request, self.sources, key, self._per_source, source=key)

    def refuse_input(self, request: web.Request, route: models.Route) -> web.Response | None:
        """429 if the input is over its own limit (`input limit`), else None."""
        limit = route.input.rate_limit
        if limit is None:
            return None
        key = route.input.id
        return self._check(request, self.inputs, key, limit, input_id=key)

    def _check(
        self,
        request: web.Request,
        buckets: Buckets,
        key: str,
        limit: models.RateLimit,
        **context: str,
    ) -> web.Response | None:
        wait, refused = buckets.take(key, limit, self._clock())
        if refused == 0:
            return None
        retry_after = max(1, math.ceil(wait))
        if refused == 1:  # once per run of refusals, not once per request
            log.info("rate_limited", limit=limit.describe(), retry_after_s=retry_after, **context)
        what = "this input" if "input_id" in context else "this source"
        return too_many(
            request, f"rate limit for {what} exceeded ({limit.describe()})", retry_after
        )


def too_many(request: web.Request, reason: str, retry_after: int) -> web.Response:
    """429 + Retry-After; a body still on its way is not read: the connection closes."""
    response = web.Response(
        status=429,
        text=f"{reason}; retry in {retry_after} s\n",
        headers={"Retry-After": str(retry_after)},
    )
    if not request.content.is_eof():
        response.force_close()
    return response


LIMITER = web.AppKey("limiter", RateLimiter)
