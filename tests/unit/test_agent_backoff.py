"""reconnect_delay: the pure function behind the agent's reconnection backoff."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_agent import errors, settings

policies = st.builds(
    lambda initial, factor, extra: settings.ReconnectPolicy(
        initial_s=initial, multiplier=factor, max_s=initial + extra
    ),
    st.floats(min_value=0.001, max_value=10),
    st.floats(min_value=1, max_value=10),
    st.floats(min_value=0, max_value=600),
)
failures = st.integers(min_value=1, max_value=10_000)
draws = st.floats(min_value=0, max_value=1)


@given(policies, failures, draws)
def test_delay_stays_between_zero_and_the_cap(
    policy: settings.ReconnectPolicy, count: int, rand: float
) -> None:
    assert 0 <= settings.reconnect_delay(policy, count, rand) <= policy.max_s


@given(policies, failures)
def test_full_jitter_scales_the_ceiling(policy: settings.ReconnectPolicy, count: int) -> None:
    ceiling = settings.reconnect_delay(policy, count, 1.0)
    assert settings.reconnect_delay(policy, count, 0.0) == 0
    assert settings.reconnect_delay(policy, count, 0.5) == pytest.approx(ceiling / 2)


@given(policies, st.integers(min_value=1, max_value=200))
def test_ceiling_never_shrinks_as_failures_grow(
    policy: settings.ReconnectPolicy, count: int
) -> None:
    assert settings.reconnect_delay(policy, count, 1.0) <= settings.reconnect_delay(
        policy, count + 1, 1.0
    )


def test_default_policy_doubles_from_half_a_second_up_to_thirty() -> None:
    policy = settings.ReconnectPolicy(jitter=settings.Jitter.NONE)
    delays = [settings.reconnect_delay(policy, count, 0.3) for count in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_huge_failure_counts_stay_at_the_cap() -> None:
    policy = settings.ReconnectPolicy()
    assert settings.reconnect_delay(policy, 10**6, 1.0) == policy.max_s


def test_no_failure_means_no_wait() -> None:
    assert settings.reconnect_delay(settings.ReconnectPolicy(), 0, 0.7) == 0


@pytest.mark.parametrize("rand", [-0.1, 1.1, float("nan")])
def test_draw_outside_the_unit_interval_is_refused(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        settings.reconnect_delay(settings.ReconnectPolicy(), 1, rand)


@pytest.mark.parametrize(
    "fields",
    [{"initial_s": 0}, {"multiplier": 0.5}, {"initial_s": 5, "max_s": 1}],
)
def test_nonsense_policies_are_config_errors(fields: dict[str, float]) -> None:
    with pytest.raises(errors.ConfigError):
        settings.ReconnectPolicy(**fields)
