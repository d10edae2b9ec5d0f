"""``python -m chunker``: command line. The one place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from chunker.params import ChunkParamsError, format_size, parse_size
from chunker.tune import (
    DEFAULT_AVG_SIZES,
    INDEX_ENTRY_BYTES,
    METADATA_MODEL,
    RECOMMENDATION_RULE,
    REFERENCE_BYTES,
    SettingReport,
    TuneInputError,
    grid_params,
    measure,
    recommend,
    version_files,
)

PROG = "python -m chunker"
EXIT_USAGE = 2  # any error the user can cause: bad arguments, paths, files

TUNE_DESCRIPTION = f"""\
Compare average chunk sizes on sample data. Each PATH is one version of the data: a
file, or a directory walked recursively (regular files only, sorted order, symbolic
links inside it skipped). Every average size of the grid is tried with min = avg/4
(rounded down) and max = avg*4. Per setting the table shows: fragment references over
all versions and unique fragments; chunk sizes min/median/p90/max (nearest rank); the
dedup ratio = total bytes / unique bytes, unique by the BLAKE3 digest of each chunk
across all versions; the metadata overhead, modelled as {REFERENCE_BYTES} bytes per
fragment reference (32-byte BLAKE3 digest + 8-byte length) plus {INDEX_ENTRY_BYTES}
bytes per unique fragment (index entry), as a fraction of the unique bytes; and the
throughput in MB/s (10^6 bytes/s) of chunking + hashing, reads excluded. The
recommended setting is the one with the least unique bytes + metadata bytes."""


class UsageError(Exception):
    """An error the user caused; printed as ``chunker: <thing>: <problem>``."""

    def __init__(self, thing: str, problem: str) -> None:
        super().__init__(f"{thing}: {problem}")
        self.thing = thing
        self.problem = problem


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and the message over several lines; one line is the
    # contract for every user error, and --help has the usage.
    def error(self, message: str) -> NoReturn:
        thing = self.prog.removeprefix(PROG).strip() or "arguments"
        self.exit(EXIT_USAGE, f"chunker: {thing}: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Content-defined chunking tools (FastCDC, ronomon).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tune = commands.add_parser(
        "tune",
        help="compare average chunk sizes on sample versions of some data",
        description=TUNE_DESCRIPTION,
    )
    tune.add_argument("paths", nargs="+", metavar="PATH", type=Path, help="one version")
    tune.add_argument(
        "--avg",
        default=",".join(format_size(size) for size in DEFAULT_AVG_SIZES),
        metavar="SIZES",
        help="comma-separated average sizes, k/m suffixes in KiB/MiB "
        "(default: %(default)s); min = avg/4, max = avg*4",
    )
    tune.add_argument("--plot", type=Path, metavar="FILE.png", help="write a PNG plot")
    tune.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _avg_sizes(text: str) -> list[int]:
    sizes: set[int] = set()
    for item in text.split(","):
        try:
            sizes.add(parse_size(item))
        except ChunkParamsError as exc:
            raise UsageError(f"--avg {item.strip()}", str(exc)) from None
    return sorted(sizes)


def _check_plot_target(path: Path) -> None:
    # Fail before the measurements, which can take minutes, not after them.
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot", "matplotlib is not installed (pip install 'annofs[tune]')")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(str(path), f"directory {str(parent)!r} does not exist")


def _run_tune(args: argparse.Namespace) -> int:
    grid = []
    for avg in _avg_sizes(args.avg):
        try:
            grid.append(grid_params(avg))
        except ChunkParamsError as exc:
            raise UsageError(
                f"--avg {format_size(avg)}", f"{exc} (min = avg/4, max = avg*4)"
            ) from None
    if args.plot is not None:
        _check_plot_target(args.plot)
    versions = [version_files(path) for path in args.paths]

    reports = [measure(versions, params) for params in grid]
    if reports[0].total_bytes == 0:
        raise UsageError("tune", "the versions hold no bytes to chunk")
    chosen = recommend(reports)

    if args.json:
        print(json.dumps(_as_json(args.paths, versions, reports, chosen), indent=1))
    else:
        _print_table(args.paths, versions, reports, chosen)
    if args.plot is not None:
        from chunker.plot import write_plot

        write_plot(reports, chosen, args.plot)
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _print_table(
    paths: Sequence[Path],
    versions: Sequence[Sequence[Path]],
    reports: Sequence[SettingReport],
    chosen: SettingReport,
) -> None:
    files = sum(len(files) for files in versions)
    print(
        f"{_count(len(paths), 'version')}, {_count(files, 'file')}, "
        f"{reports[0].total_bytes:,} bytes; min = avg/4, max = avg*4; sizes in bytes"
    )
    header = (
        "setting", "fragments", "unique", "min", "median", "p90", "max",
        "dedup", "overhead", "MB/s",
    )  # fmt: skip
    rows = [
        (
            str(r.params) + (" *" if r is chosen else ""),
            str(r.fragments),
            str(r.unique_fragments),
            str(r.size_min),
            str(r.size_median),
            str(r.size_p90),
            str(r.size_max),
            f"{r.dedup_ratio:.3f}",
            f"{100 * r.overhead:.3f}%",
            f"{r.throughput_mb_s:.0f}",
        )
        for r in reports
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        first = row[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        print(f"{first}  {rest}")
    print(f"metadata model: {METADATA_MODEL}")
    print(
        f"recommended: {chosen.params} (*), {chosen.stored_bytes:,} bytes stored; "
        f"rule: {RECOMMENDATION_RULE}"
    )


def _as_json(
    paths: Sequence[Path],
    versions: Sequence[Sequence[Path]],
    reports: Sequence[SettingReport],
    chosen: SettingReport,
) -> dict:
    def setting(r: SettingReport) -> dict:
        throughput = r.throughput_mb_s
        return {
            "params": str(r.params),
            "min_size": r.params.min_size,
            "avg_size": r.params.avg_size,
            "max_size": r.params.max_size,
            "fragments": r.fragments,
            "unique_fragments": r.unique_fragments,
            "total_bytes": r.total_bytes,
            "unique_bytes": r.unique_bytes,
            "size_min": r.size_min,
            "size_median": r.size_median,
            "size_p90": r.size_p90,
            "size_max": r.size_max,
            "dedup_ratio": r.dedup_ratio,
            "metadata_bytes": r.metadata_bytes,
            "overhead": r.overhead,
            "stored_bytes": r.stored_bytes,
            "seconds": r.seconds,
            "throughput_mb_s": throughput if math.isfinite(throughput) else None,
        }

    return {
        "versions": [
            {"path": os.fsdecode(path), "files": len(files)}
            for path, files in zip(paths, versions, strict=True)
        ],
        "metadata_model": METADATA_MODEL,
        "rule": RECOMMENDATION_RULE,
        "settings": [setting(r) for r in reports],
        "recommended": str(chosen.params),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return _run_tune(args)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error to report. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UsageError, TuneInputError) as exc:
        thing, problem = exc.thing, exc.problem
    except OSError as exc:
        thing = os.fsdecode(exc.filename) if exc.filename is not None else "I/O"
        problem = exc.strerror or str(exc)
    print(f"chunker: {thing}: {problem}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
