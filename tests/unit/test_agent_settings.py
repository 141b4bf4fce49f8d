"""Agent settings: validated on creation, with messages that say what to do."""

from __future__ import annotations

import pathlib

import pytest

from relay_agent import errors, settings


def make(**fields: object) -> settings.AgentSettings:
    values: dict[str, object] = {
        "server": "relay.example.com:7443",
        "token": "key1.secret",
        "buckets": ("orders",),
    }
    return settings.AgentSettings(**(values | fields))  # type: ignore[arg-type]


def test_defaults() -> None:
    agent = make()
    assert agent.max_in_flight == 16
    assert agent.keepalive_time_ms == 20_000
    assert agent.keepalive_timeout_ms == 10_000
    assert agent.shutdown_grace_s == 30
    assert agent.insecure is False
    assert agent.agent_name
    assert agent.key_id == "key1"


def test_the_token_is_not_in_the_repr() -> None:
    assert "secret" not in repr(make(token="key1.secret"))


@pytest.mark.parametrize("token", ["nodot", ".secret", "key1.", "", "key 1.secret", "kéy.s"])
def test_malformed_token_names_the_format_and_hides_the_token(token: str) -> None:
    with pytest.raises(errors.ConfigError, match=r"<key_id>\.<secret>") as caught:
        make(token=token)
    if token:
        assert token not in str(caught.value)


def test_a_secret_may_contain_dots() -> None:
    assert make(token="key1.a.b.c").key_id == "key1"


@pytest.mark.parametrize(
    "server", ["h:1", "10.0.0.1:7443", "[::1]:7443", "relay.example.com:65535"]
)
def test_valid_server_addresses(server: str) -> None:
    assert make(server=server).server == server


@pytest.mark.parametrize(
    "server", ["relay.example.com", ":7443", "h:0", "h:65536", "h:port", "::1:7443", "http://h:1"]
)
def test_invalid_server_addresses(server: str) -> None:
    with pytest.raises(errors.ConfigError, match="HOST:PORT"):
        make(server=server)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"buckets": ()}, "at least one bucket"),
        ({"buckets": ("a", "a")}, "given twice"),
        ({"buckets": ("",)}, "invalid bucket"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"keepalive_time_ms": 0}, "keepalive_time_ms"),
        ({"shutdown_grace_s": -1}, "shutdown_grace_s"),
        ({"agent_name": " "}, "agent name"),
        ({"insecure": True, "ca_file": pathlib.Path("ca.pem")}, "--insecure"),
        ({"insecure": True, "tls_server_name": "relay"}, "--insecure"),
    ],
)
def test_invalid_settings_are_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        make(**fields)


@pytest.mark.parametrize(
    ("url", "timeout_s"),
    [
        ("ftp://h/x", 1),
        ("http:///x", 1),
        ("http://h/x#frag", 1),
        ("http://h:99999/", 1),
        ("http://h/", 0),
        ("http://h/", float("inf")),
    ],
)
def test_invalid_http_destination_settings(url: str, timeout_s: float) -> None:
    with pytest.raises(errors.ConfigError):
        settings.HttpDestinationSettings(url=url, timeout_s=timeout_s)


def test_error_messages_default_to_the_docstring() -> None:
    assert str(errors.ConnectionLost()) == "The connection to the server was lost."
    assert isinstance(errors.TokenRefused(), errors.FatalError)
    assert isinstance(errors.BucketRefused(bucket="b"), errors.AgentError)
    assert not isinstance(errors.ConnectionLost(), errors.FatalError)
