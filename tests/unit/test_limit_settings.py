"""Limit settings refuse values that cannot work, naming the flags to fix."""

from __future__ import annotations

import pytest

from relay_server import cli, errors, models, settings


@pytest.mark.parametrize("field", ["header_timeout_s", "body_timeout_s", "idle_timeout_s"])
def test_read_deadlines_must_be_positive(field: str) -> None:
    with pytest.raises(errors.ConfigError, match="--header-timeout, --body-timeout"):
        settings.ReadLimits(**{field: 0})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_request_line", "max_header_bytes", "max_headers"])
def test_header_limits_must_be_positive(field: str) -> None:
    with pytest.raises(errors.ConfigError, match="header size limits"):
        settings.ReadLimits(**{field: 0})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_in_flight", "max_frame_bytes", "max_streams_per_token"])
def test_grpc_limits_must_be_positive(field: str) -> None:
    with pytest.raises(errors.ConfigError, match="--grpc-max-streams-per-token"):
        settings.GrpcSettings(**{field: 0})  # type: ignore[arg-type]


def test_a_source_rate_of_zero_turns_the_per_source_limit_off() -> None:
    assert cli._source_rate("0", 1000) is None
    assert cli._source_rate("600/m", 7) == models.RateLimit(per_s=10.0, burst=7)
    assert settings.IngressSettings().source_rate == models.RateLimit(per_s=1000.0, burst=2000)
