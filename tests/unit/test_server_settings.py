"""Server settings refuse values that would make the server misbehave, naming the flag."""

from __future__ import annotations

import pytest

from relay_agent import settings as agent_settings
from relay_server import errors, settings


@pytest.mark.parametrize(
    "field", ["keepalive_time_ms", "keepalive_timeout_ms", "min_agent_ping_ms"]
)
@pytest.mark.parametrize("value", [0, 2**31])
def test_keepalive_values_out_of_range_are_refused(field: str, value: int) -> None:
    with pytest.raises(errors.ConfigError, match="--grpc-keepalive-time"):
        settings.GrpcSettings(**{field: value})  # type: ignore[arg-type]


def test_a_default_agent_pings_no_more_often_than_a_default_server_allows() -> None:
    # Otherwise the server drops it with "too_many_pings" every few seconds.
    allowed = settings.GrpcSettings().min_agent_ping_ms
    assert agent_settings.DEFAULT_KEEPALIVE_TIME_MS >= allowed
