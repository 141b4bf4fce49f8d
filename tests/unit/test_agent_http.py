"""The http destination: pure helpers, then real requests to a target on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay_agent import errors, models, settings
from relay_agent.destinations import http

NOW = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)


# ---- Retry-After ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected_ms"),
    [
        (None, None),
        ("", None),
        ("120", 120_000),
        (" 5 ", 5_000),
        ("0", 0),
        ("999999", 3_600_000),  # capped at an hour
        ("Wed, 01 May 2024 12:00:30 GMT", 30_000),
        ("Wednesday, 01-May-24 12:01:00 GMT", 60_000),  # RFC 850
        ("Wed May  1 12:00:10 2024", 10_000),  # asctime
        ("Wed, 01 May 2024 11:00:00 GMT", 0),  # in the past
        ("Thu, 01 May 2025 12:00:00 GMT", 3_600_000),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("٣", None),  # a digit, but not an ASCII one
    ],
)
def test_parse_retry_after(value: str | None, expected_ms: int | None) -> None:
    assert http.parse_retry_after(value, NOW) == expected_ms


# ---- URL join and headers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "path", "query", "expected"),
    [
        ("http://127.0.0.1:9000/hooks", "/github", "", "http://127.0.0.1:9000/hooks/github"),
        ("http://127.0.0.1:9000/hooks/", "/github", "", "http://127.0.0.1:9000/hooks/github"),
        ("http://127.0.0.1:9000/hooks", "", "", "http://127.0.0.1:9000/hooks"),
        ("http://127.0.0.1:9000/hooks/", "", "", "http://127.0.0.1:9000/hooks/"),
        ("http://127.0.0.1:9000", "/a/b", "", "http://127.0.0.1:9000/a/b"),
        ("http://h/hooks", "/x%2Fy", "a=1&a=2&b=%20+c", "http://h/hooks/x%2Fy?a=1&a=2&b=%20+c"),
        ("http://h/hooks", "", "flag", "http://h/hooks?flag"),
    ],
)
def test_target_url(base: str, path: str, query: str, expected: str) -> None:
    assert http.target_url(base, path, query) == expected


def test_hop_by_hop_and_length_headers_are_dropped_and_the_rest_kept_in_order() -> None:
    headers = [
        ("Host", "public.example.com"),
        ("X-Tag", "one"),
        ("Content-Length", "12"),
        ("transfer-encoding", "chunked"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "Expires"),
        ("Upgrade", "h2c"),
        ("X-Secret-Hop", "1"),
        ("X-Stowhook-Event-Id", "forged"),
        ("x-stowhook-replay", "1"),
        ("Content-Type", "application/json"),
        ("X-Tag", "two"),
    ]
    assert http.forwarded_headers(headers) == [
        ("X-Tag", "one"),
        ("Content-Type", "application/json"),
        ("X-Tag", "two"),
    ]


def test_auto_headers_are_skipped_unless_the_event_had_them() -> None:
    assert http.missing_auto_headers([("content-type", "text/plain")]) == [
        "Accept",
        "Accept-Encoding",
        "User-Agent",
    ]


def test_forward_url_with_a_query_string_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match="query string"):
        settings.HttpDestinationSettings(url="http://127.0.0.1:9000/hooks?x=1")


# ---- against a real target ------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []
        self.status = 204
        self.answer_headers: dict[str, str] = {}
        self.delay_s = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": list(request.raw_headers),
                "body": await request.read(),
            }
        )
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status, headers=self.answer_headers, text="answer")


@pytest.fixture
async def target() -> AsyncIterator[tuple[Recorder, str]]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield recorder, f"http://127.0.0.1:{server.port}/hooks"
    finally:
        await server.close()


@pytest.fixture
async def destination_for() -> AsyncIterator:
    made: list[http.HttpDestination] = []

    def make(url: str, timeout_s: float = 5.0) -> http.HttpDestination:
        made.append(
            http.HttpDestination(settings.HttpDestinationSettings(url=url, timeout_s=timeout_s))
        )
        return made[-1]

    yield make
    for destination in made:
        await destination.close()


def delivery(**fields: object) -> models.Delivery:
    values: dict[str, object] = {
        "lease_id": "d1.3",
        "event_id": "evt-42",
        "bucket": "orders",
        "input_id": "in-1",
        "method": "PUT",
        "path": "/github/x%2Fy",
        "query": "a=1&a=2&b=%20+c",
        "headers": (
            ("Host", "public.example.com"),
            ("X-Dup", "one"),
            ("Content-Length", "999"),
            ("X-GitHub-Event", "push"),
            ("X-Dup", "two"),
        ),
        "body": bytes(range(256)) * 4,
        "received_at": NOW,
        "attempt": 3,
        "lease_deadline": NOW,
        "output": "default",
        "replay": False,
    }
    return models.Delivery(**(values | fields))  # type: ignore[arg-type]


def header_pairs(raw: object) -> list[tuple[str, str]]:
    return [(name.decode(), value.decode()) for name, value in raw]  # type: ignore[attr-defined]


async def test_request_arrives_unchanged(target, destination_for) -> None:
    recorder, url = target
    outcome = await destination_for(url).deliver(delivery())

    assert outcome == models.Ack()
    [seen] = recorder.seen
    assert seen["method"] == "PUT"
    assert seen["raw_path"] == "/hooks/github/x%2Fy?a=1&a=2&b=%20+c"
    assert seen["body"] == bytes(range(256)) * 4
    headers = header_pairs(seen["headers"])
    names = [name.lower() for name, _ in headers]
    assert [pair for pair in headers if pair[0] == "X-Dup"] == [("X-Dup", "one"), ("X-Dup", "two")]
    assert ("X-GitHub-Event", "push") in headers
    assert ("X-Stowhook-Event-Id", "evt-42") in headers
    assert ("X-Stowhook-Attempt", "3") in headers
    assert "x-stowhook-replay" not in names, "only replays are marked"
    assert dict(headers)["Host"] == url.split("/")[2]
    assert dict(headers)["Content-Length"] == "1024"
    assert names.count("host") == 1 and names.count("content-length") == 1
    # aiohttp adds nothing of its own that the original request did not have.
    for absent in ("content-type", "user-agent", "accept", "accept-encoding"):
        assert absent not in names


async def test_content_type_and_empty_path_are_forwarded_as_they_are(
    target, destination_for
) -> None:
    recorder, url = target
    event = delivery(
        method="POST",
        path="",
        query="",
        headers=(("Content-Type", "application/json"),),
        body=b"{}",
    )
    assert await destination_for(url).deliver(event) == models.Ack()
    [seen] = recorder.seen
    assert seen["raw_path"] == "/hooks"
    assert ("Content-Type", "application/json") in header_pairs(seen["headers"])


async def test_server_error_is_a_nack_with_its_retry_after(target, destination_for) -> None:
    recorder, url = target
    recorder.status, recorder.answer_headers = 500, {"Retry-After": "42"}
    outcome = await destination_for(url).deliver(delivery())
    assert outcome == models.Nack(retry_after_ms=42_000, reason="HTTP 500")


async def test_redirects_are_not_followed(target, destination_for) -> None:
    recorder, url = target
    recorder.status, recorder.answer_headers = 302, {"Location": "/elsewhere"}
    outcome = await destination_for(url).deliver(delivery())
    assert outcome == models.Nack(retry_after_ms=None, reason="HTTP 302")
    assert len(recorder.seen) == 1


async def test_slow_target_is_a_timeout_nack(target, destination_for) -> None:
    recorder, url = target
    recorder.delay_s = 2.0
    outcome = await destination_for(url, timeout_s=0.2).deliver(delivery())
    assert outcome == models.Nack(reason="timed out after 0.2s")


async def test_refused_port_is_a_connection_nack(destination_for) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = await destination_for(f"http://127.0.0.1:{port}/hooks").deliver(delivery())
    assert isinstance(outcome, models.Nack)
    assert outcome.reason.startswith("connection failed: ")
    assert outcome.retry_after_ms is None


async def test_a_replayed_event_is_marked(target, destination_for) -> None:
    recorder, url = target
    assert await destination_for(url).deliver(delivery(replay=True)) == models.Ack()
    [seen] = recorder.seen
    assert ("X-Stowhook-Replay", "1") in header_pairs(seen["headers"])


async def test_cookies_set_by_the_target_are_not_replayed(target, destination_for) -> None:
    recorder, url = target
    recorder.answer_headers = {"Set-Cookie": "session=abc; Path=/"}
    destination = destination_for(url)
    await destination.deliver(delivery())
    await destination.deliver(delivery())
    assert "cookie" not in [name.lower() for name, _ in header_pairs(recorder.seen[1]["headers"])]
