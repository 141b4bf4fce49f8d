"""Log set-up for the agent process: structlog, one event per line, to stderr.

Called once, by the CLI. Modules only ever call `structlog.get_logger(__name__)`.
JSON when stderr is not a terminal (services, containers), a console renderer on a TTY.
Tokens, bodies and headers are never passed to a logger; `_drop_secrets` is a last guard.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "console", "json"]
# Keys that must never reach a log line, whoever passes them.
_SECRET_KEYS = frozenset({"token", "authorization", "secret", "body", "headers"})
# The level configure() set; until it runs, an SDK user's own structlog set-up decides.
_threshold = logging.NOTSET


def enabled(level: int) -> bool:
    """Whether lines at `level` are written: a per-event line checks this first, since
    even a filtered structlog call costs microseconds (the lazy logger binds each time)."""
    return level >= _threshold


def configure(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog and stdlib logging to `stream` (stderr by default), filtered by level."""
    global _threshold
    out = stream if stream is not None else sys.stderr
    level_no = _threshold = _level_number(level)
    as_json = fmt == "json" or (fmt == "auto" and not _is_tty(out))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    # The console renderer prints exceptions itself; JSON needs them as a string field.
    finish: list[Any] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if as_json
        else [structlog.dev.ConsoleRenderer(colors=_is_tty(out))]
    )
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *finish],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(out, level_no, shared, finish)


def _route_stdlib_logging(out: TextIO, level_no: int, shared: list[Any], finish: list[Any]) -> None:
    # aiohttp, asyncio and friends log through the stdlib: render them the same way.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level_no)


def _drop_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in _SECRET_KEYS & event_dict.keys():
        event_dict[key] = "[redacted]"
    return event_dict


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
