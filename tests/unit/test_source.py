"""Who sent a webhook: X-Forwarded-For is believed only through trusted proxies."""

from __future__ import annotations

import pytest

from relay_server import errors
from relay_server.ingress.source import client_address, parse_networks

PROXIES = parse_networks(["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "client"),
    [
        ("203.0.113.9", ["1.2.3.4"], PROXIES, "203.0.113.9"),  # not from a proxy: ignored
        ("10.0.0.5", [], PROXIES, "10.0.0.5"),  # a proxy that named nobody
        ("10.0.0.5", ["198.51.100.7"], PROXIES, "198.51.100.7"),
        ("10.0.0.5", ["6.6.6.6, 198.51.100.7, 10.1.1.1"], PROXIES, "198.51.100.7"),
        ("10.0.0.5", ["6.6.6.6", "198.51.100.7"], PROXIES, "198.51.100.7"),  # two headers
        ("10.0.0.5", ["10.2.2.2, 10.1.1.1"], PROXIES, "10.2.2.2"),  # all proxies
        ("10.0.0.5", ["1.2.3.4, not-an-ip"], PROXIES, "10.0.0.5"),  # tampered
        ("::1", ["2001:db8::1"], PROXIES, "2001:db8::1"),
        ("10.0.0.5", ["198.51.100.7"], (), "10.0.0.5"),  # no trusted proxies at all
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    peer: str,
    forwarded: list[str],
    trusted: tuple,
    client: str,  # type: ignore[type-arg]
) -> None:
    assert client_address(peer, forwarded, trusted) == client


def test_a_bad_proxy_address_is_a_clear_error() -> None:
    with pytest.raises(errors.ConfigError, match=r"'10\.0\.0/33' is not an IP address or CIDR"):
        parse_networks(["10.0.0/33"])
