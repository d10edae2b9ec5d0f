"""The figure registry: a decorator that names a measuring function, and how one is run.

A figure function takes a `Context` and returns a `FigureResult`: its rows (annofs value,
baseline, ratio, target) and a notes paragraph saying what was measured and how. It
measures the annofs side and its baseline in the same run, so ratios are comparable even
when the machine is busy. Raise `Skip` when a precondition is missing (no network for a
download, a baseline tool not installed); any other exception is reported as an error.
"""

from __future__ import annotations

import importlib
import operator
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Modules holding @figure functions, imported in this order (it is the table's order).
FIGURE_MODULES = ("benchmarks.ingest", "benchmarks.dedup", "benchmarks.mount", "benchmarks.cp",
                  "benchmarks.trust", "benchmarks.explain", "benchmarks.load",
                  "benchmarks.reliability", "benchmarks.nar", "benchmarks.import_tree",
                  "benchmarks.dashboard", "benchmarks.exerciser", "benchmarks.fuzz",
                  "benchmarks.sparse", "benchmarks.history", "benchmarks.nix_store")

PASS, FAIL, INFO, SKIP, ERROR = "pass", "FAIL", "info", "skipped", "ERROR"


class Skip(Exception):
    """A figure could not be measured here; the message says why."""


@dataclass
class Context:
    """What a figure may use: its options and where to put files."""

    size_mib: int
    """Data size for figures that generate data (ingest)."""
    quick: bool
    """Small sizes, so that the whole run takes well under a minute."""
    work: Path
    """A scratch directory for this run, removed afterwards."""
    cache: Path
    """A directory kept between runs (downloads, unpacked releases)."""
    tree: Path | None = None
    """A host tree to read through the mount (`--tree`); None: each figure's default."""

    def log(self, message: str) -> None:
        """Progress on stderr: the table goes to the results file, not to stdout."""
        print(f"  {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One line of the results table.

    `value` and `baseline` are display strings with their units; `ratio` is
    value/baseline in the sense stated by the measure; `target` is empty (informative
    row) or an inequality on the ratio such as ``>= 0.70``.
    """

    measure: str
    value: str
    baseline: str
    ratio: float | None
    target: str = ""
    figure: str = ""
    status: str = ""
    date: str = ""

    def judge(self) -> str:
        """The status this row earns from its ratio and target (pass, FAIL or info)."""
        if self.status in (SKIP, ERROR):
            return self.status
        if not self.target or self.ratio is None:
            return INFO
        return PASS if meets(self.ratio, self.target) else FAIL


@dataclass
class FigureResult:
    """What a figure function returns."""

    rows: list[Row]
    notes: str


FigureFunc = Callable[[Context], FigureResult]


@dataclass
class Figure:
    """A registered figure."""

    name: str
    title: str
    func: FigureFunc


FIGURES: dict[str, Figure] = {}

_TARGET = re.compile(r"\s*(>=|<=|>|<)\s*([0-9.]+)\s*")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}


def meets(ratio: float, target: str) -> bool:
    """Whether `ratio` satisfies a target such as ``>= 0.70`` or ``<= 1.00``."""
    match = _TARGET.fullmatch(target)
    if match is None:
        raise ValueError(f"target {target!r} must be an inequality such as '>= 0.70'")
    op, number = match.groups()
    return _OPS[op](ratio, float(number))


def figure(name: str, title: str) -> Callable[[FigureFunc], FigureFunc]:
    """Register `func` as the figure `name` (a short slug used by --only and the table)."""

    def register(func: FigureFunc) -> FigureFunc:
        if name in FIGURES:
            raise ValueError(f"figure {name!r} registered twice")
        FIGURES[name] = Figure(name, title, func)
        return func

    return register


def load_all() -> dict[str, Figure]:
    """Import every figure module and return the registry in table order."""
    for module in FIGURE_MODULES:
        importlib.import_module(module)
    return FIGURES


def run_figure(fig: Figure, ctx: Context, date: str) -> FigureResult:
    """Run one figure, turning Skip and errors into rows; fill in names, dates, statuses."""
    try:
        result = fig.func(ctx)
    except Skip as why:
        result = FigureResult([Row("not measured", "", "", None, status=SKIP)], f"Skipped: {why}")
    except Exception as exc:
        traceback.print_exc()
        result = FigureResult(
            [Row("not measured", "", "", None, status=ERROR)],
            f"Failed: `{type(exc).__name__}: {exc}` (traceback on stderr of the run).",
        )
    for row in result.rows:
        row.figure = fig.name
        row.date = date
        row.status = row.judge()
    return result
