"""Read deadlines and header limits for every HTTP connection (slow senders, slowloris).

aiohttp 3.x has no header-read or body-read timeout: its only clock on a connection is
`keepalive_timeout` (3630 s by default), which closes a connection still waiting for a
request's headers that long after it opened or answered its last request, and nothing at
all bounds a body that trickles in while the handler reads it. One byte every few seconds
would hold a connection (and a slot of the provider-facing port) for an hour.

`GuardedHandler` is aiohttp's own `RequestHandler` with one timer per connection:

* **headers**: started when the connection opens, or by the first byte of a next request
  on a kept-alive one; if the request's headers are not all in when it fires, the
  connection is closed (after a bare `408` if any of that request had arrived);
* **body**: started once the headers are in; if the body (Content-Length or chunked) is
  not complete when it fires, the connection is closed. The handler reading it sees a
  lost connection, so nothing is stored;
* **idle**: aiohttp's `keepalive_timeout`, set to `idle_timeout_s`, closes a kept-alive
  connection on which no next request starts.

It also answers requests its parser refuses without aiohttp's own error page (which names
the software, echoes the offending header and logs it with a traceback): a request line
or header line longer than its limit, or too many header lines, gets `431`; other
malformed requests get `400`. aiohttp itself would answer 400 to all of them.

The hooks use a few of `RequestHandler`'s private attributes (`_request_count`,
`_messages`, `_request_in_progress`); tests/integration/test_slow_senders.py pins the
behaviour, so an aiohttp upgrade that changes them fails there first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import http_exceptions, streams, web, web_protocol

from relay_server.settings import ReadLimits

log = structlog.get_logger(__name__)

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections are `GuardedHandler`s under `limits`."""

    def __init__(self, app: web.Application, limits: ReadLimits, **kwargs: Any) -> None:
        super().__init__(
            app,
            max_line_size=limits.max_request_line,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.idle_timeout_s,
            **kwargs,
        )
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._limits)


class GuardedServer(web.Server):
    """aiohttp's Server (same handler, factory and options) making `GuardedHandler`s."""

    def __init__(self, stock: web.Server, limits: ReadLimits) -> None:
        super().__init__(
            stock.request_handler,
            request_factory=stock.request_factory,
            handler_cancellation=stock.handler_cancellation,
            loop=stock._loop,
            **stock._kwargs,
        )
        self._limits = limits

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, limits=self._limits, **self._kwargs)


class GuardedHandler(web_protocol.RequestHandler):
    __slots__ = ("_body", "_deadline", "_limits", "_partial")

    def __init__(self, manager: web.Server, *, limits: ReadLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._body: streams.StreamReader | None = None  # the body being received
        self._partial = False  # some of the awaited request's headers have arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._expect_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._clear()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._deadline is None:  # the first bytes of a next request
            self._expect_headers()
        if data and self._body is None:
            self._partial = True
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a request's headers are complete
            self._clear()
            body = self._messages[-1][1] if self._messages else None
            if body is not None and not body.is_eof():
                self._body = body
                self._arm(self._limits.body_timeout_s, self._body_overdue)
        elif self._body is not None and self._body.is_eof():
            self._clear()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, (http_exceptions.BadHttpMessage, web_protocol.RequestPayloadError)):
            return _refused(request, exc)
        if isinstance(exc, ConnectionError):  # the sender went away (or was cut off)
            log.debug("http_connection_lost", source=request.remote)
            response = web.Response(status=500, headers={"Server": ""})
            response.force_close()
            return response
        return super().handle_error(request, status, exc, message)

    def _expect_headers(self) -> None:
        self._clear()
        self._arm(self._limits.header_timeout_s, self._headers_overdue)

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._deadline = self._loop.call_later(delay_s, callback)

    def _clear(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._body = None
        self._partial = False

    def _headers_overdue(self) -> None:
        self._deadline = None
        if self._request_in_progress:  # a pipelined request waits for the one before it
            self._arm(self._limits.header_timeout_s, self._headers_overdue)
            return
        if self.transport is not None and self._partial:
            self.transport.write(REQUEST_TIMEOUT)
        self._close_slow("headers", self._limits.header_timeout_s)

    def _body_overdue(self) -> None:
        self._deadline = None
        if self._body is not None and not self._body.is_eof():
            self._close_slow("body", self._limits.body_timeout_s)

    def _close_slow(self, part: str, deadline_s: float) -> None:
        if self._partial or part == "body":
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.info(
                "slow_sender_closed",
                part=part,
                deadline_s=deadline_s,
                source=peer[0] if peer else None,
            )
        self._clear()
        self.force_close()


def _refused(request: web.BaseRequest, exc: Exception) -> web.Response:
    """The answer to a request the parser refused: no echo, no software name."""
    too_large = isinstance(exc, http_exceptions.LineTooLong) or "Too many headers" in str(exc)
    if too_large:
        log.info(
            "http_request_refused", status=431, reason="headers too large", source=request.remote
        )
        response = web.Response(
            status=431, text="request line or headers too large\n", headers={"Server": ""}
        )
    else:
        log.debug(
            "http_request_refused", status=400, reason=type(exc).__name__, source=request.remote
        )
        response = web.Response(status=400, text="bad request\n", headers={"Server": ""})
    response.force_close()
    return response
