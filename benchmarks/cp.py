"""Figure `cp`: an O(1) copy of a 50k-file tree, against a 100-file tree and `cp -a`.

SPEC.md §8: `annofs cp` of a 50k-file tree under 20 ms, and within 2x of copying a
100-file tree. The annofs side is `Namespace.copy` in one write transaction and the
commit (what `annofs cp` and the daemon do, without process start-up), best of RUNS; the
command line end to end is reported beside it. The baseline is `cp -a` of the same
tree on the native disk.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import time

from annofs.namespace.tree import new_file_attrs
from annofs.volume import Volume
from benchmarks.registry import Context, FigureResult, Row, figure

RUNS = 5
BIG, SMALL = 50_000, 100
PER_DIR = 100


def _fill(vol: Volume, top: bytes, files: int) -> None:
    """A tree of `files` empty files, PER_DIR to a directory, made through the namespace."""
    ns = vol.namespace
    with vol.store.write() as txn:
        ns.make_dirs(txn, [top], 0, 0)
        for d in range(0, files, PER_DIR):
            dir_id = ns.make_dirs(txn, [top, b"d%05d" % d], 0, 0)
            for i in range(d, min(files, d + PER_DIR)):
                ns.create(txn, dir_id, b"f%06d" % i, new_file_attrs(stat.S_IFREG | 0o644, 0, 0))


def _copy_time(vol: Volume, src: bytes, n: int) -> float:
    best = float("inf")
    for run in range(RUNS):
        start = time.perf_counter()
        with vol.store.write() as txn:
            vol.namespace.copy(txn, [src], [b"%s-copy-%d-%d" % (src, n, run)])
        best = min(best, time.perf_counter() - start)
    return best


def _host_tree(root, files: int) -> None:
    for d in range(0, files, PER_DIR):
        sub = root / f"d{d:05d}"
        sub.mkdir(parents=True)
        for i in range(d, min(files, d + PER_DIR)):
            (sub / f"f{i:06d}").touch()


@figure("cp", "annofs cp of a 50k-file tree")
def cp(ctx: Context) -> FigureResult:
    """O(1) copy against a 100-file tree and against cp -a on the native disk."""
    big = SMALL * 10 if ctx.quick else BIG
    store = ctx.work / "cp-store"
    vol = Volume.open(store, create=True)
    try:
        ctx.log(f"cp: building trees of {big} and {SMALL} files in the store")
        _fill(vol, b"big", big)
        _fill(vol, b"small", SMALL)
        t_big = _copy_time(vol, b"big", big)
        t_small = _copy_time(vol, b"small", SMALL)
    finally:
        vol.close()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "annofs.cli.main", "--store", str(store), "cp",
                    "/big", "/big-cli"], check=True, capture_output=True)
    t_cli = time.perf_counter() - start
    host = ctx.work / "cp-host"
    ctx.log(f"cp: making a {big}-file tree on the native disk for cp -a")
    _host_tree(host / "big", big)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-a", str(host / "big"), str(host / "big-copy")], check=True)
    t_native = time.perf_counter() - start
    ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
    rows = [
        Row(f"copy of a {big}-file tree vs 20 ms", ms(t_big), "20 ms", t_big / 0.020,
            "<= 1.00"),
        Row(f"copy of {big} files vs {SMALL} files", ms(t_big), ms(t_small),
            t_big / t_small, "<= 2.00"),
        Row(f"copy of {big} files vs cp -a on the native disk", ms(t_big), ms(t_native),
            t_big / t_native),
        Row("`annofs cp` command end to end (process start included)", ms(t_cli), ms(t_big),
            t_cli / t_big),
    ]
    notes = f"""\
What: `Namespace.copy` of a tree of {big} empty files ({PER_DIR} per directory) inside one
LMDB write transaction including its commit, best of {RUNS}; the same for {SMALL} files.
The copy adds one entry and one reference to the source's directory node; nothing is
walked (stores with hard links inside the copied tree copy only the directories on the
way to them). Baseline: `cp -a` of an identical tree of empty files on the native disk
(after `sync`). The command line row includes Python start-up and opening the store."""
    return FigureResult(rows, notes)
