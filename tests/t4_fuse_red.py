"""A hostile local user (uid 65534 through `--allow-other`) against the gate and the
mount's responsiveness, on t4_fuse_symlinks's fixture (a signed /src/proj the attacker
owns and may write, an unguarded /scratch). Each test is an attack that must fail: no
unjudged byte under /src reaches a reader, and one user's requests do not freeze the
mount for another."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Mount
from fuse_helpers import RENAME_EXCHANGE, as_user, renameat2
from t4_fuse_symlinks import (  # noqa: F401  (fixtures)
    EVIL,
    MAIN,
    base,
    mnt,
    proj,
)


def _slowest_stat_while(m: Mount, attack: Callable[..., object], *args: object,
                        seconds: float) -> float:
    """Run `attack(*args)` as uid 65534 in the background; meanwhile root stats and reads
    a small file of its own under /scratch, over and over for `seconds`: the slowest."""
    mine = m.path / "scratch" / "root.txt"
    mine.write_bytes(b"x" * 100)
    attacker = threading.Thread(target=as_user, args=(attack, *args))
    attacker.start()
    worst = 0.0
    try:
        time.sleep(0.5)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t0 = time.monotonic()
            os.stat(mine)
            (m.path / "scratch" / f"r{i}").write_bytes(b"y")  # a new name: no cache
            worst = max(worst, time.monotonic() - t0)
            i += 1
            time.sleep(0.01)
    finally:
        attacker.join(600)
    return worst


# -- hard links: every open judges every name ------------------------------------------------


def _many_links(target: str, d: str, n: int) -> None:
    os.mkdir(d)
    for i in range(n):
        os.link(target, f"{d}/l{i}")
    for i in range(n):
        os.stat(f"{d}/l{i}")  # every name looked up: the kernel knows them all


def _open_for(path: str, seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        os.close(os.open(path, os.O_RDONLY))
        n += 1
    print(f'attacker opens: {n}', flush=True)
    return n


def test_a_file_with_many_hard_links_does_not_freeze_the_mount(mnt: Mount) -> None:  # noqa: F811
    """Every judged open judges the file under each name the kernel knows (the strictest
    holds). uid 65534 gives a file of its own 20,000 names and opens it in a loop."""
    f = mnt.path / "scratch" / "many"
    as_user(lambda: Path(f).write_bytes(b"hello\n"))
    t0 = time.monotonic()
    as_user(_many_links, str(f), str(mnt.path / "scratch" / "links"), 20000)
    print(f"20000 links: {time.monotonic() - t0:.1f} s")
    worst = _slowest_stat_while(mnt, _open_for, str(f), 8.0, seconds=6.0)
    assert worst < 1.0, f"root's stat and create waited {worst:.2f} s"


# -- extended attributes: one record of any size ---------------------------------------------


def _fat_xattrs(path: str, n: int) -> None:
    value = os.urandom(64 * 1024)
    for i in range(n):
        os.setxattr(path, f"user.x{i}", value)


def test_xattrs_of_one_file_cannot_grow_without_bound(mnt: Mount) -> None:  # noqa: F811
    """Every getattr, lookup and setxattr reads (and setxattr rewrites) the whole record
    of the file's attributes, xattrs included, on the event loop."""
    f = mnt.path / "scratch" / "fat"
    as_user(lambda: Path(f).write_bytes(b"hello\n"))
    t0 = time.monotonic()
    worst = _slowest_stat_while(mnt, _fat_xattrs, str(f), 1000, seconds=6.0)
    print(f"xattrs: {time.monotonic() - t0:.1f} s")
    assert worst < 1.0, f"root's stat and create waited {worst:.2f} s"


# -- an inode moved between the victim's lookup and its open ---------------------------------


def _exchange_loop(a: str, b: str, seconds: float) -> int:
    """Swap `a` and `b` (renameat2 RENAME_EXCHANGE) over and over for `seconds`."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        renameat2(a, b, RENAME_EXCHANGE)
        n += 1
    return n


def test_an_unsigned_file_swapped_out_between_lookup_and_open_is_refused(
        mnt: Mount) -> None:  # noqa: F811
    """The kernel resolves the victim's path to an inode, then sends OPEN without the
    name; the daemon judges the inode under the names it has when OPEN arrives. uid
    65534 swaps its unsigned file in /scratch with the signed /src/proj/main.c over and
    over: a victim that resolved main.c to the unsigned inode, whose OPEN comes after the
    next swap, is judged under /scratch (no signers needed) and reads the unsigned
    bytes through /src/proj/main.c."""
    f = proj(mnt) / "main.c"
    evil = mnt.path / "scratch" / "mine.c"
    as_user(lambda: Path(evil).write_bytes(EVIL))
    stop = threading.Event()
    counts = {"read": 0, "refused": 0, "gone": 0}
    wrong: list[bytes] = []

    def victim() -> None:
        while not stop.is_set():
            try:
                data = f.read_bytes()
            except PermissionError:
                counts["refused"] += 1
                continue
            except FileNotFoundError:
                counts["gone"] += 1
                continue
            if data != MAIN:
                wrong.append(data)
            counts["read"] += 1

    t = threading.Thread(target=victim)
    t.start()
    try:
        swaps = as_user(_exchange_loop, str(evil), str(f), 10.0)
    finally:
        stop.set()
        t.join()
    print(swaps, counts, len(wrong))
    assert counts["read"], counts
    assert not wrong, f"{len(wrong)} reads of /src/proj/main.c got {wrong[0]!r}"
