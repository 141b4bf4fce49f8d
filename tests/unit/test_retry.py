from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_server import models, retry

POLICY = retry.RetryPolicy()  # 5 s initial, factor 2, cap 1 h, 60 attempts, 48 h


@given(failures=st.integers(min_value=1, max_value=10_000), rand=st.floats(0, 1, exclude_max=True))
def test_full_jitter_stays_between_zero_and_the_capped_ceiling(failures: int, rand: float) -> None:
    delay = retry.backoff_ms(POLICY, failures, rand)
    assert 0 <= delay <= retry.backoff_ceiling_ms(POLICY, failures) <= POLICY.cap_ms


def test_the_ceiling_doubles_from_five_seconds_up_to_one_hour() -> None:
    ceilings = [retry.backoff_ceiling_ms(POLICY, n) for n in range(1, 13)]
    assert ceilings[:4] == [5_000, 10_000, 20_000, 40_000]
    assert ceilings[-1] == 3_600_000
    assert ceilings == sorted(ceilings)


@given(attempts=st.integers(min_value=1, max_value=59), age=st.integers(0, 48 * 3_600_000 - 1))
def test_a_failure_with_attempts_and_age_left_is_retried_later(attempts: int, age: int) -> None:
    decision = retry.after_failure(
        POLICY, attempts=attempts, first_attempt_ms=0, now_ms=age, retry_after_ms=None, rand=0.5
    )
    assert decision.state is models.DeliveryState.PENDING
    assert age <= decision.available_at_ms <= age + POLICY.cap_ms


@given(attempts=st.integers(min_value=60, max_value=1000))
def test_a_failure_at_max_attempts_is_dead(attempts: int) -> None:
    decision = retry.after_failure(
        POLICY, attempts=attempts, first_attempt_ms=0, now_ms=1, retry_after_ms=None
    )
    assert decision.state is models.DeliveryState.DEAD


def test_a_failure_past_max_age_is_dead_even_with_attempts_left() -> None:
    decision = retry.after_failure(
        POLICY, attempts=2, first_attempt_ms=0, now_ms=48 * 3_600_000, retry_after_ms=None
    )
    assert decision.state is models.DeliveryState.DEAD


@given(retry_after=st.integers(min_value=0, max_value=10**9))
def test_retry_after_replaces_backoff_but_never_exceeds_the_cap(retry_after: int) -> None:
    decision = retry.after_failure(
        POLICY, attempts=1, first_attempt_ms=0, now_ms=1000, retry_after_ms=retry_after
    )
    assert decision.available_at_ms == 1000 + min(retry_after, POLICY.cap_ms)


@pytest.mark.parametrize(
    "kwargs", [{"initial_ms": -1}, {"factor": 0.5}, {"max_attempts": 0}, {"cap_ms": 1}]
)
def test_impossible_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        retry.RetryPolicy(**kwargs)  # type: ignore[arg-type]
