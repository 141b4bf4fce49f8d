"""The http destination: replay each event as an HTTP request to an internal URL.

Same method, path tail, raw query string, headers (in order, duplicates kept, minus the
hop-by-hop ones) and body bytes. 2xx is an Ack; anything else, a timeout or a connection
failure is a Nack. Redirects are not followed. Bodies and headers are never logged.

When a caller waits for the answer (`Delivery.reply_wanted`, input response mode "wait"),
the outcome carries the target's status, headers (minus hop-by-hop ones) and body, up to
MAX_REPLY_BODY_BYTES; a larger body is left out and flagged (the caller then gets 502).
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
from collections.abc import Iterable

import aiohttp
import structlog
import yarl

from relay_agent import models, settings

log = structlog.get_logger(__name__)

# Never forwarded: they describe one hop of the original request, not the event.
# Expect is here too: the body is already complete, there is nothing to negotiate.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)
EVENT_ID_HEADER = "X-Stowhook-Event-Id"
ATTEMPT_HEADER = "X-Stowhook-Attempt"
REPLAY_HEADER = "X-Stowhook-Replay"  # "1" when an operator replayed a stored event
OUR_PREFIX = "x-stowhook-"  # a sender's headers with this prefix are dropped, never forwarded
# Headers aiohttp adds on its own unless told not to; the event decides whether they exist.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
MAX_RETRY_AFTER_MS = 3_600_000  # a target cannot park an event for more than an hour
# Read at most this much of the target's answer, so the connection can be reused.
_DRAIN_LIMIT_BYTES = 64 * 1024
# The largest answer relayed to a waiting caller (the server enforces the same cap).
MAX_REPLY_BODY_BYTES = 1024 * 1024


class HttpDestination:
    """Forwards deliveries over one aiohttp ClientSession (created on first use)."""

    def __init__(self, destination_settings: settings.HttpDestinationSettings) -> None:
        self._settings = destination_settings
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def __aenter__(self) -> HttpDestination:
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def deliver(self, delivery: models.Delivery) -> models.Outcome:
        timeout_s = self._settings.timeout_s
        try:
            return await self._request(delivery)
        except TimeoutError:
            return models.Nack(reason=f"timed out after {timeout_s:g}s")
        except aiohttp.ClientConnectionError as exc:
            return models.Nack(reason=f"connection failed: {_describe(exc)}")
        except aiohttp.ClientError as exc:
            return models.Nack(reason=f"request failed: {_describe(exc)}")

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    async def _request(self, delivery: models.Delivery) -> models.Outcome:
        headers = forwarded_headers(delivery.headers)
        headers += [(EVENT_ID_HEADER, delivery.event_id), (ATTEMPT_HEADER, str(delivery.attempt))]
        if delivery.replay:
            headers.append((REPLAY_HEADER, "1"))
        async with self._client().request(
            delivery.method,
            yarl.URL(target_url(self._settings.url, delivery.path, delivery.query), encoded=True),
            headers=headers,
            data=delivery.body or None,
            skip_auto_headers=missing_auto_headers(headers),
            allow_redirects=False,
        ) as response:
            outcome = _outcome(response)
            if delivery.reply_wanted:
                return dataclasses.replace(outcome, response=await captured(response))
            await _drain(response)
            return outcome

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the HttpDestination is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
                # Concurrency is bounded by the agent's max_in_flight, not here.
                connector=aiohttp.TCPConnector(limit=0),
                # Cookies set by the target must not leak into the next event's headers.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session


def target_url(base: str, path: str, query: str) -> str:
    """The base URL joined with the event's path tail, plus its raw query string."""
    url = base.rstrip("/") + path if path else base
    return f"{url}?{query}" if query else url


def forwarded_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The event's headers minus hop-by-hop ones (also those named by Connection)
    and any that pretend to be ours; order and duplicates kept."""
    headers = list(headers)
    dropped = set(HOP_BY_HOP_HEADERS)
    for name, value in headers:
        if name.lower() == "connection":
            dropped.update(token.strip().lower() for token in value.split(","))
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in dropped and not name.lower().startswith(OUR_PREFIX)
    ]


def missing_auto_headers(headers: Iterable[tuple[str, str]]) -> list[str]:
    present = {name.lower() for name, _ in headers}
    return [name for name in _AUTO_HEADERS if name.lower() not in present]


def parse_retry_after(value: str | None, now: datetime.datetime) -> int | None:
    """Retry-After (delta-seconds or HTTP-date) in milliseconds, capped at an hour.

    None when absent or unreadable; 0 when the date has passed.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(int(value) * 1000, MAX_RETRY_AFTER_MS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates: RFC 9110 dates are always GMT
        when = when.replace(tzinfo=datetime.UTC)
    delay_ms = int((when - now).total_seconds() * 1000)
    return min(max(delay_ms, 0), MAX_RETRY_AFTER_MS)


def _outcome(response: aiohttp.ClientResponse) -> models.Ack | models.Nack:
    if 200 <= response.status < 300:
        return models.Ack()
    retry_after_ms = parse_retry_after(
        response.headers.get("Retry-After"), datetime.datetime.now(datetime.UTC)
    )
    return models.Nack(retry_after_ms=retry_after_ms, reason=f"HTTP {response.status}")


async def captured(response: aiohttp.ClientResponse) -> models.Response:
    """The target's answer for a waiting caller; a body over the cap is left out."""
    body = bytearray()
    while len(body) <= MAX_REPLY_BODY_BYTES:
        chunk = await response.content.read(MAX_REPLY_BODY_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    too_large = len(body) > MAX_REPLY_BODY_BYTES
    return models.Response(
        status=response.status,
        headers=tuple(forwarded_headers(response.headers.items())),
        body=b"" if too_large else bytes(body),
        body_too_large=too_large,
    )


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read a little of the answer so the connection can be reused; the status decided."""
    remaining = _DRAIN_LIMIT_BYTES
    try:
        while remaining > 0:
            chunk = await response.content.read(remaining)
            if not chunk:
                return
            remaining -= len(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # The outcome stands; the connection is simply not reused.
        log.debug("response_drain_failed", error=_describe(exc))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
