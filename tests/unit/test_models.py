from __future__ import annotations

import concurrent.futures
import datetime as dt
import uuid

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_server import console, ids, models
from tests.unit import forked


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
    assert all(uuid.UUID(made_id).version == 7 for made_id in made)
    assert all(str(uuid.UUID(made_id)) == made_id for made_id in made)  # canonical form


def test_ids_made_from_many_threads_are_all_distinct() -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: [ids.new_id() for _ in range(5000)], range(4)))
    made = [made_id for batch in batches for made_id in batch]
    assert len(set(made)) == len(made)
    assert all(batch == sorted(batch) for batch in batches)


def test_a_forked_child_makes_ids_its_parent_does_not() -> None:
    ids.new_id()
    child_ids, parent_ids = forked.both_sides(lambda: [ids.new_id() for _ in range(100)])
    assert not set(child_ids) & set(parent_ids)


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
