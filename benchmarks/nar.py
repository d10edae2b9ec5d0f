"""Figure `nar-hash`: `annofs nar hash` of an imported tree against Nix's `nix-hash`.

SPEC.md §6: `annofs nar hash` equals `nix-hash --type sha256 --base32` of the same tree.
Here: how long each takes. The annofs side serialises the tree as a NAR from the store
(every fragment read is checked against its BLAKE3 hash) and hashes it with SHA-256; Nix
serialises the host tree from the native disk. Both are whole commands, process start-up
included, on the same tree in the same run; both must print the same hash. A second
pair restores the tree's NAR: `annofs nar restore FILE DEST` (which checks the whole
archive before it writes) against `nix-store --restore DIR < FILE` on the native disk.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.data import KIB, MIB
from benchmarks.mount import (
    annofs_cmd,
    annofs_import,
    code,
    code_revision,
    drop_caches,
    new_store,
    small_files,
    tree_facts,
    write_tree,
)
from benchmarks.registry import Context, FigureResult, Row, Skip, figure

RUNS = 3
FILES, QUICK_FILES = 15_000, 1_500  # log-uniform 100 B .. 128 KiB: ~18 KiB mean
BIG_FILES = 2  # and a few large files, each many fragments
BIG_SIZE, QUICK_BIG_SIZE = 16 * MIB, 2 * MIB


def _tree(ctx: Context) -> tuple[Path, str]:
    if ctx.tree is not None:
        return ctx.tree, f"the tree given with --tree ({ctx.tree})"
    files = QUICK_FILES if ctx.quick else FILES
    big = QUICK_BIG_SIZE if ctx.quick else BIG_SIZE
    root = ctx.work / "nar-tree"
    data = small_files(files, seed=23, lo=100, hi=128 * KIB)
    data += [(f"big/b{i}", random.Random(1000 + i).randbytes(big)) for i in range(BIG_FILES)]
    write_tree(root, data)
    return root, (f"a generated tree of {files} files of 100 B-128 KiB (log-uniform, seeded "
                  f"random bytes) and {BIG_FILES} files of {big // MIB} MiB")


def timed(cmd: list[str], cwd: Path | None = None, stdin: Path | None = None) -> tuple[float, str]:
    """Run a command to completion: (seconds taken, its stdout stripped); RuntimeError
    with the end of its stderr if it fails."""
    start = time.perf_counter()
    if stdin is not None:
        with open(stdin, "rb") as f:
            proc = subprocess.run(cmd, stdin=f, capture_output=True, text=True, cwd=cwd)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}: "
                           f"{proc.stderr.strip()[-1000:]}")
    return took, proc.stdout.strip()


@figure("nar-hash", "annofs nar hash of an imported tree against nix-hash of the same tree")
def nar_hash_figure(ctx: Context) -> FigureResult:
    nix_hash, nix_store = shutil.which("nix-hash"), shutil.which("nix-store")
    if nix_hash is None or nix_store is None:
        raise Skip("nix-hash / nix-store not installed (Debian's nix-bin)")
    tree, origin = _tree(ctx)
    nfiles, ndirs, nlinks, nbytes = tree_facts(tree)
    store = new_store(ctx.work / "nar-store")
    cwd = code(store.parent).cwd
    ctx.log(f"nar-hash: importing {nfiles} files ({nbytes / 1e6:.0f} MB) from {tree}")
    annofs_import(store, tree, "/tree")
    ann_cmd = annofs_cmd("--store", str(store), "nar", "hash", "/tree")
    nix_cmd = [nix_hash, "--type", "sha256", "--base32", str(tree)]

    best: dict[str, float] = {}
    cold: dict[str, float] = {}
    printed: dict[str, str] = {}
    for name, cmd in (("annofs", ann_cmd), ("nix", nix_cmd)):
        drop_caches()
        cold[name], printed[name] = timed(cmd, cwd)
        best[name] = min(timed(cmd, cwd)[0] for _ in range(RUNS))
        ctx.log(f"nar-hash {name}: cold {cold[name]:.2f} s, warm best of {RUNS} "
                f"{best[name]:.2f} s")
    if printed["annofs"] != "sha256:" + printed["nix"]:
        raise RuntimeError(f"the hashes differ: annofs {printed['annofs']}, "
                           f"nix-hash {printed['nix']}")

    # The same tree's NAR restored: into the store, and by Nix onto the native disk.
    nar = ctx.work / "tree.nar"
    with open(nar, "wb") as f:
        subprocess.run([nix_store, "--dump", str(tree)], stdout=f, check=True)
    t_restore = min(timed(annofs_cmd("--store", str(store), "nar", "restore", str(nar),
                                      f"/restored-{i}"), cwd)[0] for i in range(RUNS))
    t_nix_restore = float("inf")
    for i in range(RUNS):
        t_nix_restore = min(t_nix_restore, timed(
            [nix_store, "--restore", str(ctx.work / f"nix-restored-{i}")], stdin=nar)[0])
    mb = nbytes / 1e6
    s = lambda x: f"{x:.2f} s ({mb / x:.0f} MB/s)"  # noqa: E731
    rows = [
        Row("`annofs nar hash` vs `nix-hash --type sha256 --base32`, warm", s(best["annofs"]),
            s(best["nix"]), best["annofs"] / best["nix"]),
        Row("the same, cold (page cache dropped before each)", s(cold["annofs"]),
            s(cold["nix"]), cold["annofs"] / cold["nix"]),
        Row("`annofs nar restore FILE DEST` vs `nix-store --restore DIR < FILE`",
            s(t_restore), s(t_nix_restore), t_restore / t_nix_restore),
    ]
    notes = f"""\
What: the NAR hash of one tree, {nfiles} files, {ndirs} directories, {nlinks} symlinks,
{mb:.0f} MB: {origin}. annofs: `annofs --store S nar hash /tree` after `annofs import`
of the tree (serialised from the store, every fragment checked against its BLAKE3 hash,
then SHA-256). Nix: `nix-hash --type sha256 --base32 TREE` of the host tree on the
native disk. Whole commands, Python/Nix start-up included; warm: best of {RUNS} runs
after one cold run; cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before the run.
Both printed the same hash ({printed['annofs']}). Restore: the tree's NAR
(`nix-store --dump`, {nar.stat().st_size / 1e6:.0f} MB) restored into the store as
a new path (annofs reads the archive twice: a full check before it writes anything,
then the restore) against `nix-store --restore` onto the native disk, best of {RUNS},
warm. Code measured: {code_revision()}."""
    return FigureResult(rows, notes)
