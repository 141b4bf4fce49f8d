from __future__ import annotations

import datetime as dt

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_server import console, ids, models


@given(attempt=st.integers(min_value=0, max_value=2**31))
def test_lease_ids_carry_the_delivery_and_the_attempt(attempt: int) -> None:
    delivery_id = ids.new_id()
    lease_id = models.format_lease_id(delivery_id, attempt)
    assert models.parse_lease_id(lease_id) == (delivery_id, attempt)


UUID7 = "01a20973-88cc-7cd0-b754-1c4822bbbb1e"


@pytest.mark.parametrize("bad", ["", "abc", "abc.1", f"{UUID7}.x", UUID7, "."])
def test_malformed_lease_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed lease id"):
        models.parse_lease_id(bad)


def test_ids_sort_by_creation_time() -> None:
    made = [ids.new_id() for _ in range(200)]
    assert made == sorted(made)


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        models.to_ms(dt.datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("15m", 900_000),
        ("48h", 172_800_000),
        ("7d", 604_800_000),
        ("2", 2000),
        ("1.5s", 1500),
    ],
)
def test_durations_parse(text: str, ms: int) -> None:
    assert console.parse_duration_ms(text) == ms


def test_a_bad_duration_says_what_is_expected() -> None:
    with pytest.raises(click.BadParameter, match="like 30s, 15m, 48h or 7d"):
        console.parse_duration_ms("soon")
