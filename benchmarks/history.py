"""Figure `history`: what random rewrites through the mount leave in the store, and what
`annofs gc --keep-last 1` (run mounted) gives back, against the file's logical size.

Every open + pwrite + close through the mount stores a version (issue 18: a 20k-operation
random-write run grew a store to 5.3 GB). One file of SIZE bytes is rewritten WRITES times
at random offsets (1 byte to 64 KiB each, its own open and close), then gc keeps the
current version only. Measured: the store on disk (`du`), the fragment bytes it holds
(`annofs fsck --json`), before and after gc; then the same number of rewrites again, to
show what the space freed by gc is worth on disk (LMDB reuses freed pages rather than
shrinking its file).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from benchmarks.registry import Context, FigureResult, Row, figure

MiB = 1 << 20


def _du(path: Path) -> int:
    """Bytes on disk (allocated blocks), as `du` counts them."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


def _rewrite(path: Path, size: int, rnd: random.Random, count: int) -> float:
    """`count` random overwrites, each its own open/pwrite/close; seconds taken."""
    start = time.perf_counter()
    for _ in range(count):
        n = rnd.randrange(1, 65536)
        off = rnd.randrange(size - n)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, rnd.randbytes(n), off)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def _annofs_json(store: Path, *args: str) -> dict[str, object]:
    from benchmarks.mount import annofs_cmd, code

    proc = subprocess.run(annofs_cmd("--store", str(store), *args, "--json"),
                          capture_output=True, text=True, check=False,
                          cwd=code(store.parent).cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"annofs {' '.join(args)}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def _annofs_umount(store: Path, mountpoint: Path) -> None:
    from benchmarks.mount import annofs_cmd, code

    proc = subprocess.run(annofs_cmd("--store", str(store), "umount", str(mountpoint)),
                          capture_output=True, text=True, check=False,
                          cwd=code(store.parent).cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"annofs umount: exit {proc.returncode}: "
                           f"{proc.stderr.strip()[-500:]}")


def _db_bytes(store: Path, name: str) -> int:
    """Bytes of LMDB pages one named database takes (read beside the daemon)."""
    from annofs.volume import Volume

    vol = Volume.open(store)
    try:
        with vol.store.read() as txn:
            st = txn.stat(vol.store.db[name])
        return int((st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])
                   * st["psize"])
    finally:
        vol.close()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@figure("history", "random rewrites through the mount: store size before and after "
                   "gc --keep-last 1")
def history_figure(ctx: Context) -> FigureResult:
    from annofs.daemon.client import request
    from benchmarks.mount import daemon, new_store

    size = 8 * MiB if ctx.quick else 32 * MiB
    writes = 500 if ctx.quick else 3000
    store = new_store(ctx.work / "history-store")
    d = daemon(ctx, store, "history-mnt")
    d.start()
    try:
        f = d.mountpoint / "f"
        rnd = random.Random(18)
        f.write_bytes(rnd.randbytes(size))
        request(store, "commit")
        disk_initial = _du(store)
        ctx.log(f"history: {writes} random rewrites of a {size // MiB} MiB file")
        took = _rewrite(f, size, rnd, writes)
        request(store, "commit")  # every close stored before anything is measured
        frag_before = _annofs_json(store, "fsck")  # after the daemon stored every close
        disk_before = _du(store)
        versions_before = _db_bytes(store, "versions")
        t = time.perf_counter()
        gc = _annofs_json(store, "gc", "--keep-last", "1")
        gc_s = time.perf_counter() - t
        frag_after = _annofs_json(store, "fsck")
        disk_after = _du(store)
        ctx.log(f"history: {writes} more rewrites, then gc again")
        _rewrite(f, size, rnd, writes)
        request(store, "commit")
        disk_again = _du(store)
        _annofs_json(store, "gc", "--keep-last", "1")
        disk_end = _du(store)
        problems = d.log_problems()
        # `annofs umount`, which compacts the LMDB file once the daemon let go of it.
        t = time.perf_counter()
        _annofs_umount(store, d.mountpoint)
        umount_s = time.perf_counter() - t
        disk_compacted = _du(store)
    finally:
        d.stop()
    if problems:
        raise RuntimeError(f"the daemon logged: {problems[:3]}")
    if not (frag_before["ok"] and frag_after["ok"]):
        raise RuntimeError(f"fsck: {frag_before['problems']} {frag_after['problems']}")
    fb, fa = int(frag_before["fragment_bytes"]), int(frag_after["fragment_bytes"])  # type: ignore[call-overload]
    rows = [
        Row(f"store on disk after {writes} rewrites / logical size", _mb(disk_before),
            _mb(size), disk_before / size),
        Row("fragment bytes held after the rewrites / logical size", _mb(fb), _mb(size),
            fb / size),
        Row("version records (LMDB pages of `versions`) after the rewrites / logical size",
            _mb(versions_before), _mb(size), versions_before / size),
        Row("fragment bytes held after gc --keep-last 1 / logical size", _mb(fa), _mb(size),
            fa / size),
        Row("store on disk after gc --keep-last 1 / logical size", _mb(disk_after),
            _mb(size), disk_after / size),
        Row(f"disk growth of {writes} more rewrites after gc / growth of the first "
            f"{writes} (freed pages reused)", _mb(disk_again - disk_after),
            _mb(disk_before - disk_initial),
            (disk_again - disk_after) / (disk_before - disk_initial)),
        Row("gc --keep-last 1 (mounted), seconds / rewrite time", f"{gc_s:.1f} s",
            f"{took:.1f} s", gc_s / took),
        Row(f"store on disk after `annofs umount` (LMDB compacted) / before it (after "
            f"{2 * writes} rewrites and two gc)", _mb(disk_compacted), _mb(disk_end),
            disk_compacted / disk_end),
        Row("store on disk after `annofs umount` / logical size", _mb(disk_compacted),
            _mb(size), disk_compacted / size),
    ]
    freed = _mb(int(gc["bytes_freed"]))  # type: ignore[call-overload]
    notes = (f"benchmarks/history.py: one {size // MiB} MiB file rewritten {writes} times "
             f"through a real mount (open, pwrite of 1 B-64 KiB at a random offset, close: "
             f"one version each, {writes / took:.0f} rewrites/s), then `annofs gc "
             f"--keep-last 1` through the daemon: {gc['versions_freed']} versions and "
             f"{gc['fragments_freed']} fragments freed ({freed}, {gc['versions_kept']} "
             f"versions kept). Fragment bytes are `annofs fsck --json`'s `fragment_bytes`; "
             f"on disk is `du -s` of the store directory. Each version record holds the "
             f"file's whole fragment list (36 bytes a fragment), so every close also costs "
             f"that much. Fragments live in zstd packs, which gc compacts (the on-disk drop "
             f"after gc); the version records live in LMDB, which never shrinks its file: "
             f"its freed pages are reused by later writes (the growth row), and `annofs "
             f"umount` compacts it once the daemon has let go of the store (store.compact: "
             f"when free pages are at least 25% of the file; the umount took "
             f"{umount_s:.1f} s in all). Command: `python -m benchmarks --only history`.")
    return FigureResult(rows, notes)
