"""CLI output: aligned tables for people, JSON for scripts; duration and rate parsing."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import click

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(text: str) -> int:
    """'500ms', '30s', '15m', '48h', '7d', '2w' (bare numbers are seconds)."""
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 15m, 48h or 7d")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2) or "s"])


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*$")
_RATE_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def parse_rate(text: str) -> float:
    """'10/s', '600/m', '100/h' (a bare number is per second) -> requests per second."""
    match = _RATE.match(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a rate like 10/s, 600/m or 100/h")
    return float(match.group(1)) / _RATE_UNIT_S[match.group(2) or "s"]


def format_duration_ms(ms: int) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNIT_MS[unit]
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def format_bytes(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # unreachable


def format_age_ms(ms: int) -> str:
    """A rough age for people: '45s', '12m', '3h', '2d'."""
    for unit in ("d", "h", "m", "s"):
        if ms >= _UNIT_MS[unit]:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def format_time(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def to_jsonable(value: Any) -> Any:
    """Plain JSON values; bytes (e.g. a configured response body) become base64.

    Dataclass fields hidden from repr (secrets, password hashes) are left out.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=False))


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(click.style(line.rstrip(), bold=True) if index == 0 else line.rstrip())
