"""What an input answers its caller once the webhook is committed.

Three response modes (`models.ResponseMode`, set per input with `input respond`):

* accept: 200 with an empty body;
* static: the configured status, headers and body;
* wait: the destination's own answer, relayed by the agent that forwarded the event
  (`waiting.Waiting` holds the caller); when none comes within the timeout, 504 or,
  with a fallback, the configured static answer. The event is committed either way.

What an operator configures is checked here (`check_mode`) and so is what an agent sends
back (`from_reply`): the agent sits behind the firewall, but its answer is relayed to
strangers, so hop-by-hop and malformed headers are dropped, and an unusable status or an
oversized body become 502. No answer names server software: the app empties `Server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from relay_server import models

log = structlog.get_logger(__name__)

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")  # an HTTP token
# Visible ASCII, spaces and tabs inside; no CR, LF or other control characters.
HEADER_VALUE = re.compile(r"^[\x21-\x7e]([\t\x20-\x7e]*[\x21-\x7e])?$|^$")
MAX_HEADER_VALUE = 4096
MAX_HEADERS = 50
MAX_STATIC_BODY_BYTES = 64 * 1024  # a configured answer is kept in the inputs table
MAX_REPLY_BODY_BYTES = 1024 * 1024  # the agent drops larger answers (body_too_large)
MIN_WAIT_MS = 100
MAX_WAIT_MS = 10 * 60_000
# Never relayed or configured: they describe one hop, or the server computes them.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "server",
        "date",
    }
)
NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """An HTTP answer for a caller, already checked."""

    status: int
    headers: models.Headers = ()
    body: bytes = b""


ACCEPTED = Answer(status=200)
GATEWAY_TIMEOUT = Answer(status=504)
BAD_GATEWAY = Answer(status=502)


def check_status(status: int) -> None:
    """ValueError unless `status` can be a final answer (1xx cannot)."""
    if not 200 <= status <= 599:
        raise ValueError(f"status must be between 200 and 599, not {status}")


def check_header(name: str, value: str) -> None:
    """ValueError naming what is wrong with a header an answer would carry."""
    if not HEADER_NAME.match(name):
        raise ValueError(f"{name[:100]!r} is not a header name")
    if name.lower() in HOP_BY_HOP:
        raise ValueError(f"{name} cannot be set: the server writes it (or it is hop-by-hop)")
    if len(value) > MAX_HEADER_VALUE or not HEADER_VALUE.match(value):
        raise ValueError(
            f"the value of {name} must be at most {MAX_HEADER_VALUE} printable ASCII "
            "characters, without line breaks"
        )


def check_mode(mode: models.ResponseMode) -> None:
    """ValueError explaining why `mode` cannot be configured."""
    check_status(mode.status)
    if len(mode.headers) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} headers")
    for name, value in mode.headers:
        check_header(name, value)
    if len(mode.body) > MAX_STATIC_BODY_BYTES:
        raise ValueError(f"the body must be at most {MAX_STATIC_BODY_BYTES} bytes")
    if mode.body and mode.status in NO_BODY_STATUSES:
        raise ValueError(f"a {mode.status} answer has no body")
    if not MIN_WAIT_MS <= mode.timeout_ms <= MAX_WAIT_MS:
        raise ValueError(
            f"the timeout must be between {MIN_WAIT_MS} ms and {MAX_WAIT_MS // 60_000} minutes"
        )


def from_reply(
    status: int, headers: Iterable[tuple[str, str]], body: bytes, *, too_large: bool
) -> Answer:
    """The caller's answer from an agent's Reply: 502 when it cannot be relayed as is."""
    try:
        check_status(status)
    except ValueError:
        log.warning("reply_unusable", reason="status", status=status)
        return BAD_GATEWAY
    if too_large or len(body) > MAX_REPLY_BODY_BYTES:
        log.warning("reply_unusable", reason="body too large", status=status)
        return BAD_GATEWAY
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        try:
            check_header(name, value)
        except ValueError:
            continue
        kept.append((name, value))
    return Answer(
        status=status,
        headers=tuple(kept[:MAX_HEADERS]),
        body=b"" if status in NO_BODY_STATUSES else body,
    )


def configured(mode: models.ResponseMode) -> Answer:
    """The mode's static answer (static, and wait's fallback)."""
    return Answer(status=mode.status, headers=mode.headers, body=mode.body)


def immediate(mode: models.ResponseMode) -> Answer:
    """The answer that needs no destination: accept, static, or a duplicate of any mode."""
    return configured(mode) if mode.kind is models.ResponseKind.STATIC else ACCEPTED


def on_timeout(mode: models.ResponseMode) -> Answer:
    return configured(mode) if mode.fallback else GATEWAY_TIMEOUT


async def answer(mode: models.ResponseMode, waiter: asyncio.Future[Answer | None] | None) -> Answer:
    """The answer for a committed webhook; waits for the destination in wait mode.

    `waiter` is None in wait mode when the server already holds as many callers as it
    may (or is shutting down): the caller gets the timeout answer at once.
    """
    if mode.kind is not models.ResponseKind.WAIT:
        return immediate(mode)
    got: Answer | None = None
    if waiter is not None:
        with contextlib.suppress(TimeoutError):
            got = await asyncio.wait_for(waiter, mode.timeout_ms / 1000)
    if got is None:
        log.info("reply_timed_out", timeout_ms=mode.timeout_ms, fallback=mode.fallback)
        return on_timeout(mode)
    log.info("reply_relayed", status=got.status)
    return got


def describe(mode: models.ResponseMode) -> str:
    """One line for people: 'accept', 'static 201 (1 header, 12-byte body)', 'wait 30s ...'."""
    if mode.kind is models.ResponseKind.ACCEPT:
        return "accept (200, empty)"
    count = len(mode.headers)
    answer = (
        f"{mode.status} ({count} header{'' if count == 1 else 's'}, {len(mode.body)}-byte body)"
    )
    if mode.kind is models.ResponseKind.STATIC:
        return f"static {answer}"
    seconds = f"{mode.timeout_ms / 1000:g}s"
    return f"wait up to {seconds}, then {answer if mode.fallback else '504'}"
