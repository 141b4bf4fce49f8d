"""The ports the tests and benches give their servers.

A port the kernel picks for a probe goes back to its ephemeral pool, where an outgoing
connection can take it before the server binds it (CI saw a relay fail to start with
"address already in use"). `free_port` hands out ports outside that pool instead.
"""

from __future__ import annotations

import socket

from bench import procs


def test_ports_are_outside_the_ephemeral_range_distinct_and_bindable() -> None:
    low, high = procs._ephemeral_range()
    ports = [procs.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high]
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_skipped() -> None:
    ahead = procs.free_port() + 1  # where the walk goes next, unless it just wrapped
    if ahead >= procs._ephemeral_range()[0]:
        ahead = procs.free_port() + 1
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", ahead))
        listener.listen()
        assert procs.free_port() != ahead
