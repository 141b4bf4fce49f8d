"""Failed-auth throttling per source, on a fake clock."""

from __future__ import annotations

import pytest

from relay_server import errors, settings, throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    clock: Clock, *, max_failures: int = 3, max_sources: int = 100
) -> throttle.FailureThrottle:
    return throttle.FailureThrottle(
        max_failures=max_failures, window_s=60.0, max_sources=max_sources, clock=clock
    )


def test_a_source_is_refused_after_n_failures_until_its_window_ends() -> None:
    clock = Clock()
    failures = make(clock)
    for _ in range(3):
        failures.check("203.0.113.9")
        failures.failed("203.0.113.9")
        clock.now += 10
    with pytest.raises(throttle.TooManyFailures) as caught:
        failures.check("203.0.113.9")
    assert caught.value.retry_after_s == 30  # the window began 30 s ago
    failures.check("198.51.100.7")  # others are not affected
    clock.now += 30
    failures.check("203.0.113.9")  # the window has passed: a fresh start
    failures.failed("203.0.113.9")
    failures.check("203.0.113.9")


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    clock = Clock()
    failures = make(clock)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"):
        failures.failed(host)
    with pytest.raises(throttle.TooManyFailures):
        failures.check("2001:db8:1:2::99")
    failures.check("2001:db8:1:3::1")
    for _ in range(3):
        failures.failed("::ffff:192.0.2.1")
    with pytest.raises(throttle.TooManyFailures):
        failures.check("192.0.2.1")


def test_the_table_is_bounded_and_drops_the_least_recent_source() -> None:
    clock = Clock()
    failures = make(clock, max_sources=2)
    for source in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        for _ in range(3):
            failures.failed(source)
    failures.check("192.0.2.1")  # dropped to make room
    for source in ("192.0.2.2", "192.0.2.3"):
        with pytest.raises(throttle.TooManyFailures):
            failures.check(source)


def test_zero_turns_it_off() -> None:
    failures = make(Clock(), max_failures=0)
    for _ in range(100):
        failures.failed("192.0.2.1")
    failures.check("192.0.2.1")


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:203.0.113.9:5555", "203.0.113.9"),
        ("ipv6:[2001:db8::1]:5555", "2001:db8::1"),
        ("unix:/run/stowhook.sock", "unix:/run/stowhook.sock"),
    ],
)
def test_grpc_peers_name_their_address(peer: str, address: str) -> None:
    assert throttle.grpc_peer_address(peer) == address


@pytest.mark.parametrize(("limit", "window_s"), [(-1, 60.0), (20, 0.0)])
def test_bad_throttle_settings_are_named(limit: int, window_s: float) -> None:
    with pytest.raises(errors.ConfigError, match="--auth-failure-limit must be 0"):
        settings.AuthThrottleSettings(max_failures=limit, window_s=window_s)
