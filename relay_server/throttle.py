"""Failed-auth throttling per source, shared by the webhook ingress and the agent streams.

A public server that checks passwords, tokens and signatures invites guessing. After
`max_failures` refused credentials from one source within `window_s`, that source's
further attempts are refused (HTTP 429 + Retry-After, gRPC RESOURCE_EXHAUSTED) without
looking at what they present, until the window that began with its first failure ends.
A right credential does not clear the count: holding one token must not buy guesses at
another.

IPv6 sources count per /64 (one host usually owns a whole /64). The table holds at most
`max_sources` sources, dropping the least recently failed first, so a flood of addresses
costs bounded memory.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import time
from collections.abc import Callable

from relay_server import errors

DEFAULT_MAX_FAILURES = 20
DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_SOURCES = 10_000


class TooManyFailures(errors.RelayError):
    """Too many failed authentication attempts from this address; try again later."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed authentication attempts; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def source_key(address: str) -> str:
    """What failures count against: the IPv4 address, the IPv6 /64, or the text as is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def grpc_peer_address(peer: str) -> str:
    """'ipv4:203.0.113.9:5555' or 'ipv6:[2001:db8::1]:5555' -> the address alone."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


class FailureThrottle:
    def __init__(
        self,
        *,
        max_failures: int = DEFAULT_MAX_FAILURES,
        window_s: float = DEFAULT_WINDOW_S,
        max_sources: int = DEFAULT_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`max_failures` 0 turns throttling off."""
        self._max = max_failures
        self._window_s = window_s
        self._max_sources = max_sources
        self._clock = clock
        # source key -> (when its window began, failures in it); least recent first
        self._entries: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()

    def check(self, address: str) -> None:
        """TooManyFailures if `address` used up its failures in the current window."""
        if self._max == 0:
            return
        key = source_key(address)
        entry = self._entries.get(key)
        if entry is None:
            return
        started, failures = entry
        left = started + self._window_s - self._clock()
        if left <= 0:
            del self._entries[key]
        elif failures >= self._max:
            raise TooManyFailures(max(1, math.ceil(left)))

    def failed(self, address: str) -> None:
        """Count one refused credential from `address`."""
        if self._max == 0:
            return
        key, now = source_key(address), self._clock()
        started, failures = self._entries.pop(key, (now, 0))
        if started + self._window_s <= now:
            started, failures = now, 0
        self._entries[key] = (started, failures + 1)
        while len(self._entries) > self._max_sources:
            self._entries.popitem(last=False)
