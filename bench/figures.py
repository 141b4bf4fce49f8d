"""One measured figure, and how the bench suite prints and keeps them.

Every figure is a ratio against a baseline measured in the same run on the same machine,
with the goal it must reach. A figure that misses its goal is reported (`ok: false`),
never raised: the bench measures, the tests judge correctness.

    {"name", "value", "unit", "baseline_name", "baseline_value", "ratio", "goal", "ok"}
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

RESULTS = pathlib.Path(__file__).parent / "results"


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    name: str
    value: float | None  # None: the scenario failed before it could measure
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str = ""  # readable, e.g. "ratio >= 0.60"; empty: reported only
    ok: bool | None = None  # None: no goal

    def as_json(self) -> str:
        return json.dumps(asdict(self))


def ratio_figure(
    name: str,
    value: float,
    unit: str,
    baseline_name: str,
    baseline_value: float,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
) -> Figure:
    """`value / baseline_value`, judged against `at_least` and/or `at_most`.

    A baseline of 0 (it measured nothing) gives no ratio, and misses any goal.
    """
    ratio = value / baseline_value if baseline_value else None
    goals, ok = [], None
    if at_least is not None:
        goals.append(f"ratio >= {at_least:g}")
        ok = ratio is not None and ratio >= at_least
    if at_most is not None:
        goals.append(f"ratio <= {at_most:g}")
        ok = (ok is not False) and ratio is not None and ratio <= at_most
    return Figure(
        name=name,
        value=round(value, 3),
        unit=unit,
        baseline_name=baseline_name,
        baseline_value=round(baseline_value, 3),
        ratio=None if ratio is None else round(ratio, 3),
        goal=" and ".join(goals),
        ok=ok,
    )


def bound_figure(
    name: str,
    value: float,
    unit: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    baseline_name: str | None = None,
    baseline_value: float | None = None,
    goal: str = "",
) -> Figure:
    """`value` judged against absolute bounds; a baseline, if given, is shown with its ratio.

    `goal` replaces the generated text (e.g. "<= direct p50 + 3 ms" for a bound computed
    from a baseline).
    """
    texts, ok = [], None
    if at_least is not None:
        texts.append(f">= {at_least:g} {unit}")
        ok = value >= at_least
    if at_most is not None:
        texts.append(f"== 0 {unit}" if at_most == 0 and not at_least else f"<= {at_most:g} {unit}")
        ok = (ok is not False) and value <= at_most
    ratio = None
    if baseline_value:
        ratio = round(value / baseline_value, 3)
    return Figure(
        name=name,
        value=round(value, 3),
        unit=unit,
        baseline_name=baseline_name,
        baseline_value=None if baseline_value is None else round(baseline_value, 3),
        ratio=ratio,
        goal=goal or " and ".join(texts),
        ok=ok,
    )


def failed_figure(name: str, unit: str, error: str) -> Figure:
    """A figure its scenario could not measure (it raised): no value, goal missed."""
    return Figure(name=name, value=None, unit=unit, goal=f"not measured: {error}"[:200], ok=False)


def _cells(fig: Figure) -> list[str]:
    base = "" if fig.baseline_value is None else f"{fig.baseline_value:g} ({fig.baseline_name})"
    verdict = "" if fig.ok is None else ("ok" if fig.ok else "MISSED")
    return [
        fig.name,
        "-" if fig.value is None else f"{fig.value:g}",
        fig.unit,
        base,
        "" if fig.ratio is None else f"{fig.ratio:.3f}",
        f"{fig.goal} {verdict}".strip(),
    ]


HEADINGS = ["figure", "value", "unit", "baseline", "ratio", "goal"]


def table(figures: Sequence[Figure]) -> str:
    """A readable table of `figures`, one line each, columns as wide as their cells."""
    rows = [HEADINGS, *(_cells(fig) for fig in figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADINGS))]
    right = {1, 3, 4}  # numbers
    lines = []
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def markdown(figures: Sequence[Figure]) -> str:
    """The same table in Markdown, for the README."""
    lines = ["| " + " | ".join(HEADINGS) + " |", "|" + "---|" * len(HEADINGS)]
    lines += ["| " + " | ".join(_cells(fig)) + " |" for fig in figures]
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save(
    figures: Sequence[Figure], extra: dict[str, object], path: pathlib.Path | None = None
) -> pathlib.Path:
    """Write the run to bench/results/latest.json (or `path`)."""
    path = path or RESULTS / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine(), **extra, "figures": [asdict(fig) for fig in figures]}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
