"""Who sent a request: the TCP peer, or the client a trusted reverse proxy names.

`X-Forwarded-For` is believed only when the peer is one of the operator's trusted proxies
(`serve --trusted-proxy CIDR`), and then only as far back as the chain stays inside the
trusted set: the first untrusted hop from the right is the client. Anyone can write the
header, so without trusted proxies it is ignored entirely.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from relay_server import errors

if TYPE_CHECKING:
    from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FORWARDED_FOR = "X-Forwarded-For"
MAX_HOPS = 20  # a longer chain is not believed past this many entries


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses; ConfigError naming the bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as exc:
            raise errors.ConfigError(
                f"--trusted-proxy {text!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)"
            ) from exc
    return tuple(networks)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The client's address given the TCP peer and the X-Forwarded-For header values."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded for hop in value.split(",")][-MAX_HOPS:]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed hop: believe nothing the proxies relayed
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def source_of(request: web.Request, trusted: tuple[Network, ...]) -> str:
    peer = request.remote or ""
    if not trusted:  # the usual case, and once per webhook: skip the header look-up
        return peer
    return client_address(peer, request.headers.getall(FORWARDED_FOR, ()), trusted)
