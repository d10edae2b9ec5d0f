"""`python -m benchmarks`: measure the SPEC.md §8 figures and merge them into RESULTS.md.

Usage::

    python -m benchmarks [--only NAME[,NAME]] [--size-mib N] [--quick] [--tree PATH]
                         [--out PATH] [--list]

Without --only every registered figure runs. --quick uses small sizes (64 MiB of ingest
data, 2 releases) so the whole run takes well under a minute once downloads are cached,
and by default writes `benchmarks/work/RESULTS-quick.md` so that a smoke run never
overwrites the real figures. Exit status: 0 when every figure was measured (a FAIL row is
a finding, not a crash) or skipped, 1 if a figure raised an error, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import report
from benchmarks.registry import ERROR, Context, load_all, run_figure

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / "work"
DEFAULT_OUT = BENCH_DIR / "RESULTS.md"
QUICK_OUT = WORK_DIR / "RESULTS-quick.md"
DEFAULT_SIZE_MIB = 1024
QUICK_SIZE_MIB = 64


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure annofs figures against their baselines; merge into RESULTS.md.",
    )
    p.add_argument("--only", metavar="NAME[,NAME]", help="run only these figures")
    p.add_argument("--size-mib", type=int, metavar="N",
                   help=f"generated data size (default {DEFAULT_SIZE_MIB}, "
                        f"{QUICK_SIZE_MIB} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke run (default --out goes to benchmarks/work/)")
    p.add_argument("--out", type=Path, metavar="PATH",
                   help="results file to merge into (default benchmarks/RESULTS.md, or "
                        "benchmarks/work/RESULTS-quick.md with --quick)")
    p.add_argument("--tree", type=Path, metavar="PATH",
                   help="host tree the mount-tar figure imports and reads (default: Debian's "
                        "linux-source-6.1, or a generated 5k-file tree with --quick)")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the scratch directory under benchmarks/work/")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected figures and write the results file; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(args_list)
    figures = load_all()
    if args.list:
        for fig in figures.values():
            print(f"{fig.name:16} {fig.title}")
        return 0
    names = list(figures)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in figures]
        if unknown:
            parser.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(figures)}")
    size_mib = args.size_mib if args.size_mib is not None else (
        QUICK_SIZE_MIB if args.quick else DEFAULT_SIZE_MIB)
    if size_mib < 1:
        parser.error("--size-mib must be at least 1")
    if args.tree is not None and not args.tree.is_dir():
        parser.error(f"--tree {args.tree}: not a directory")
    out: Path = args.out if args.out is not None else (QUICK_OUT if args.quick else DEFAULT_OUT)
    command = shlex.join(["python", "-m", "benchmarks", *args_list])
    now = datetime.now(UTC)
    date, stamp = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m-%d %H:%M UTC")
    load_at_start = report.load_average()

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=WORK_DIR))
    ctx = Context(size_mib=size_mib, quick=args.quick, work=scratch, cache=WORK_DIR / "cache",
                  tree=args.tree.resolve() if args.tree is not None else None)
    new = report.Results([], {})
    failed = False
    try:
        for name in names:
            fig = figures[name]
            print(f"{name}: {fig.title}", file=sys.stderr, flush=True)
            load_before = report.load_average()
            cpu_before = report.cpu_seconds()
            start = time.perf_counter()
            result = run_figure(fig, ctx, date)
            elapsed = time.perf_counter() - start
            others = report.other_cpu(cpu_before, report.cpu_seconds(), elapsed)
            failed |= any(row.status == ERROR for row in result.rows)
            provenance = (
                f"_Measured {stamp} with `{command}` in {elapsed:.0f} s, on {os.cpu_count()} "
                f"CPUs. Load average (1/5/15 min) {load_before} before, "
                f"{report.load_average()} after; other work (other processes, hypervisor "
                f"steal) kept {others:.2f} CPUs busy on average meanwhile._"
            )
            new.rows += result.rows
            new.notes[name] = (f"{name}: {fig.title}",
                               report.reflow(f"{provenance}\n\n{result.notes}"))
            for row in result.rows:
                ratio = "—" if row.ratio is None else f"{row.ratio:.2f}"
                print(f"  {row.status:7} {row.measure}: {row.value} vs {row.baseline} "
                      f"(ratio {ratio}, target {row.target or '—'})", flush=True)
    finally:
        if args.keep_work:
            print(f"scratch kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    merged = report.merge(report.read(out), new, figures)
    report.write(out, report.render(merged, date=stamp, command=command,
                                    facts=report.machine_facts(), load=load_at_start))
    print(f"wrote {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
