"""The token bucket behind per-input and per-source rate limits, and the flags that set them."""

from __future__ import annotations

import itertools

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_server import cli, cli_limits, console, models
from relay_server.ingress import limits

TOLERANCE = 1e-6  # float arithmetic over a few hundred refills

rates = st.floats(min_value=0.1, max_value=1000.0)
bursts = st.integers(min_value=1, max_value=50)
gaps = st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=150)


def arrivals(gaps_s: list[float]) -> list[float]:
    return list(itertools.accumulate(gaps_s, initial=1000.0))


@given(rate=rates, burst=bursts, gaps_s=gaps)
@settings(max_examples=300)
def test_never_more_than_burst_plus_rate_times_elapsed_over_any_interval(
    rate: float, burst: int, gaps_s: list[float]
) -> None:
    times = arrivals(gaps_s)
    bucket = limits.TokenBucket.full(models.RateLimit(per_s=rate, burst=burst), times[0])
    accepted = [t for t in times if bucket.take(t) == 0.0]
    for i, start in enumerate(accepted):
        for j in range(i, len(accepted)):
            elapsed = accepted[j] - start
            assert j - i + 1 <= burst + rate * elapsed + TOLERANCE, (
                f"{j - i + 1} accepted in {elapsed:.6f}s at {rate}/s burst {burst}"
            )


@given(rate=rates, burst=bursts, gaps_s=gaps)
@settings(max_examples=300)
def test_the_wait_given_on_refusal_is_enough_and_no_more(
    rate: float, burst: int, gaps_s: list[float]
) -> None:
    limit = models.RateLimit(per_s=rate, burst=burst)
    bucket = limits.TokenBucket.full(limit, 0.0)
    for _ in range(burst):
        assert bucket.take(0.0) == 0.0
    for now in arrivals(gaps_s):
        wait = bucket.take(now)
        if wait == 0.0:
            continue
        assert wait <= 1.0 / rate + TOLERANCE
        probe = limits.TokenBucket(limit=limit, tokens=bucket.tokens, stamp=bucket.stamp)
        assert probe.take(now + wait * 0.99) > 0.0, "let through before the wait was over"
        assert probe.take(now + wait * 1.000001 + 1e-9) == 0.0, "still refused after the wait"


@given(rate=st.floats(min_value=1.0, max_value=200.0), burst=bursts)
def test_a_flood_gets_the_whole_budget(rate: float, burst: int) -> None:
    """Ten times the rate for 10 s: accepted = burst + rate x 10 s (to one request)."""
    bucket = limits.TokenBucket.full(models.RateLimit(per_s=rate, burst=burst), 0.0)
    step = 1.0 / (10 * rate)
    accepted = sum(bucket.take(n * step) == 0.0 for n in range(int(10.0 / step) + 1))
    assert abs(accepted - (burst + rate * 10.0)) <= 1


def test_a_sender_under_the_rate_is_never_refused() -> None:
    bucket = limits.TokenBucket.full(models.RateLimit(per_s=5.0, burst=1), 0.0)
    assert all(bucket.take(n * 0.2) == 0.0 for n in range(1000))


def test_refusals_in_a_row_are_counted_and_reset_by_a_pass() -> None:
    bucket = limits.TokenBucket.full(models.RateLimit(per_s=1.0, burst=1), 0.0)
    assert [bucket.take(0.0) > 0 for _ in range(3)] == [False, True, True]
    assert bucket.refused == 2
    assert bucket.take(1.0) == 0.0 and bucket.refused == 0


def test_tracked_keys_are_bounded_and_full_buckets_forgotten() -> None:
    buckets = limits.Buckets(max_keys=100)
    limit = models.RateLimit(per_s=10.0, burst=5)
    for n in range(50_000):  # a flood of distinct (spoofed-looking) sources
        buckets.take(f"198.51.{n // 256}.{n % 256}", limit, 0.0)
    assert len(buckets) == 100
    buckets.take("203.0.113.1", limit, 10.0)  # every other bucket is full again by now
    assert len(buckets) == 1


def test_a_changed_limit_starts_a_fresh_bucket() -> None:
    buckets = limits.Buckets()
    tight, loose = models.RateLimit(per_s=1.0, burst=1), models.RateLimit(per_s=1.0, burst=3)
    assert buckets.take("input", tight, 0.0) == (0.0, 0)
    assert buckets.take("input", tight, 0.0)[1] == 1
    assert buckets.take("input", loose, 0.0) == (0.0, 0)


def test_a_rate_limit_needs_a_positive_rate_and_burst() -> None:
    for per_s, burst in ((0.0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0)):
        with pytest.raises(ValueError, match="rate above 0"):
            models.RateLimit(per_s=per_s, burst=burst)


@pytest.mark.parametrize(
    ("text", "per_s"), [("10/s", 10.0), ("600/m", 10.0), ("36/h", 0.01), ("5", 5.0), ("0", 0.0)]
)
def test_rates_are_read_per_second_minute_or_hour(text: str, per_s: float) -> None:
    assert console.parse_rate(text) == pytest.approx(per_s)


def test_a_bad_rate_is_refused_with_an_example() -> None:
    with pytest.raises(click.BadParameter, match="like 10/s, 600/m or 100/h"):
        console.parse_rate("ten per second")


def test_input_limit_flags() -> None:
    assert cli_limits.rate_limit("10/s", 20, off=False) == models.RateLimit(per_s=10, burst=20)
    assert cli_limits.rate_limit("90/m", None, off=False) == models.RateLimit(per_s=1.5, burst=2)
    assert cli_limits.rate_limit(None, None, off=True) is None
    for rate, burst, off, message in (
        (None, None, False, "give --rate"),
        ("0/s", None, False, "above 0"),
        ("10/s", None, True, "--off takes no"),
    ):
        with pytest.raises(click.UsageError, match=message):
            cli_limits.rate_limit(rate, burst, off)


def test_input_limit_is_a_command_of_the_input_group() -> None:
    result = CliRunner().invoke(cli.main, ["input", "limit", "--help"])
    assert result.exit_code == 0, result.output
    assert "--rate N/s" in result.output and "--burst" in result.output and "--off" in result.output
