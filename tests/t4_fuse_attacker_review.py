"""Attacks by a hostile local user (uid 65534 through `--allow-other`) on a real mount
with an enforcing policy: the fixture of t4_fuse_symlinks (a signed /src/proj that the
attacker owns and may write, an unguarded /scratch). Each test is an attempt that must
fail for the attacker: no unsigned byte under /src may reach a reader."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import Mount, Templates
from fuse_helpers import as_user, remove_and_prune
from t4_fuse_symlinks import (  # noqa: F401  (fixtures)
    EVIL,
    MAIN,
    base,
    errno_of,
    make_mount,
    mnt,
    proj,
    refusals,
    run,
    stop_and_check,
)
from t4_fuse_trust import write_policy


def _feed_fifo(path: str, data: bytes, done: str) -> None:
    """Open the FIFO for writing (waiting up to 10 s for a reader, or until the file
    `done` exists: the reader has given up) and write `data`."""
    deadline = time.monotonic() + 10
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            if time.monotonic() > deadline or os.path.exists(done):
                return
            time.sleep(0.05)
    os.set_blocking(fd, True)
    os.write(fd, data)
    os.close(fd)


def _cat_while_fed(path: str) -> bytes:
    """What a reader of `path` gets while the attacker writes EVIL into it (if a FIFO)."""
    # Where the feeder (another uid) sees that cat has ended: in /tmp, open to all.
    fd, done = tempfile.mkstemp(prefix="annofs-cat-done-")
    os.close(fd)
    os.unlink(done)
    feeder = threading.Thread(target=lambda: errno_of(_feed_fifo, path, EVIL, done))
    feeder.start()
    try:
        res = subprocess.run(["timeout", "5", "cat", path], capture_output=True)
    finally:
        Path(done).touch()
        feeder.join(15)
        os.unlink(done)
    return res.stdout


def _unlink_then_mkfifo(path: str) -> None:
    os.unlink(path)
    os.mkfifo(path, 0o644)


def _mkfifo_in_dir(d: str) -> None:
    os.mkdir(d)
    os.mkfifo(os.path.join(d, "main.c"), 0o644)


def _exchange(a: str, b: str) -> None:
    """renameat2(RENAME_EXCHANGE): `a` and `b` swap places."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                      rename_exchange) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _mv(src: str, dst: str) -> int:
    return subprocess.run(["mv", src, dst], capture_output=True).returncode


def test_no_fifo_can_take_a_signed_file_s_place(mnt: Mount) -> None:  # noqa: F811
    """A FIFO's open and reads are served by the kernel, never judged by the daemon: in
    place of signed main.c it handed `cat` the attacker's bytes (found in this review).
    Now no FIFO is made, renamed or moved in a directory under a rule that needs
    signers; under /scratch FIFOs work as before."""
    f = proj(mnt) / "main.c"
    scratch = mnt.path / "scratch"
    # mkfifo in place of the signed file
    assert errno_of(_unlink_then_mkfifo, str(f)) == errno.EACCES
    assert not f.exists()
    assert EVIL not in _cat_while_fed(str(f))
    # a FIFO made under /scratch works there, and cannot be renamed in
    as_user(os.mkfifo, str(scratch / "pipe"), 0o644)
    assert _cat_while_fed(str(scratch / "pipe")) == EVIL
    assert errno_of(os.rename, str(scratch / "pipe"), str(f)) == errno.EXDEV
    assert errno_of(os.link, str(scratch / "pipe"), str(f)) == errno.EXDEV
    # swapped in with RENAME_EXCHANGE, for a signed file that is there
    assert errno_of(_exchange, str(scratch / "pipe"), str(proj(mnt) / "rel")) == errno.EXDEV
    assert errno_of(_exchange, str(proj(mnt) / "rel"), str(scratch / "pipe")) == errno.EXDEV
    # nor moved in inside a directory (mv falls back to a copy, whose mkfifo is refused)
    as_user(_mkfifo_in_dir, str(scratch / "d"))
    assert errno_of(os.rename, str(scratch / "d"), str(proj(mnt) / "d")) == errno.EXDEV
    assert as_user(_mv, str(scratch / "d"), str(proj(mnt) / "d")) != 0
    moved = proj(mnt) / "d" / "main.c"
    assert not (moved.exists() and stat.S_ISFIFO(moved.lstat().st_mode))
    assert EVIL not in _cat_while_fed(str(moved))
    # a directory without FIFOs still moves in; a FIFO moves within /scratch
    as_user(os.mkdir, str(scratch / "plain"))
    as_user(os.rename, str(scratch / "plain"), str(proj(mnt) / "plain"))
    as_user(os.rename, str(scratch / "pipe"), str(scratch / "pipe2"))


def _make_sparse(paths: list[str], size: int) -> None:
    for path in paths:
        with open(path, "wb") as f:
            f.write(b"unsigned\n")
        os.truncate(path, size)


def _open_all(paths: list[str]) -> None:
    """Open every path at once (each open makes the daemon hash the file's holes)."""
    def one(p: str) -> None:
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError:
            pass

    threads = [threading.Thread(target=one, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_flood_of_opens_that_hash_does_not_stall_other_users(mnt: Mount) -> None:  # noqa: F811
    """A file's digest is computed at its first judged open, in a worker thread: for a
    sparse file that is up to 16 GiB of zeros. uid 65534 opening 48 such files at once
    took every worker thread the daemon had (trio's 40), and root's open of a fresh
    100-byte file waited 18 s behind them (files of 2 GiB; these are 1 GiB, half the
    wait, still three times the bound). Hashing threads are bounded per uid."""
    paths = [str(mnt.path / "scratch" / f"big{i}") for i in range(48)]
    as_user(_make_sparse, paths, 1 << 30)
    flood = threading.Thread(target=as_user, args=(_open_all, paths))
    flood.start()
    try:
        time.sleep(1.0)
        mine = mnt.path / "scratch" / "root.txt"
        mine.write_bytes(b"x" * 100)
        t0 = time.monotonic()
        assert mine.read_bytes() == b"x" * 100
        took = time.monotonic() - t0
    finally:
        flood.join(300)
        remove_and_prune(mnt, paths)
    assert took < 3.0, f"root's open waited {took:.1f} s behind another user's hashing"


def _punch(path: str, flags: int) -> bytes | None:
    """Open the signed file for writing (read-write: judged, it is signed), punch a hole
    in its first bytes, and read back through the same handle if it can read."""
    falloc_fl_keep_size, falloc_fl_punch_hole = 1, 2
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, flags)
    try:
        if libc.fallocate(fd, falloc_fl_punch_hole | falloc_fl_keep_size, 0, 8) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return os.pread(fd, 8, 0) if flags & os.O_ACCMODE == os.O_RDWR else None
    finally:
        os.close(fd)


def test_a_hole_punched_in_a_signed_file_is_refused_to_every_later_reader(
        mnt: Mount) -> None:  # noqa: F811
    """fallocate(PUNCH_HOLE) through a verified read-write handle changes the content:
    the next open, by anyone, judges the new version (refused: unsigned); a reader that
    opened the signed version before keeps reading it."""
    f = proj(mnt) / "main.c"
    os.chown(f, 65534, 65534)  # the attacker may write it (chown changes no verdict)
    with open(f, "rb") as before:
        # Beside a judged reader a read-write handle is EBUSY (trust.admission); a
        # write-only one may punch, and the reader keeps the signed bytes.
        try:
            as_user(_punch, str(f), os.O_RDWR)
            raise AssertionError("a read-write open beside a judged reader")
        except OSError as e:
            assert e.errno == errno.EBUSY
        assert as_user(_punch, str(f), os.O_WRONLY) is None
        assert errno_of(Path.read_bytes, f) == errno.EACCES
        try:
            f.read_bytes()
            raise AssertionError("root read the punched file")
        except PermissionError:
            pass
        assert before.read() == MAIN  # pinned to the version judged at its open
    # A read-write handle alone reads its own punched bytes; the next open is judged.
    g = proj(mnt) / "lib" / "util.c"
    os.chown(g, 65534, 65534)
    assert as_user(_punch, str(g), os.O_RDWR) == b"\0" * 8
    assert errno_of(Path.read_bytes, g) == errno.EACCES


def _open_refused_many(path: str, times: int) -> int:
    refused = 0
    for _ in range(times):
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            refused += 1
    return refused


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _root_refused_a_patched_file(mnt: Mount) -> object:  # noqa: F811
    """Root patches a signed file and is refused its read: the one event recorded."""
    patched = proj(mnt) / "lib" / "util.c"
    patched.write_bytes(b"int util(void) { return 2; }\n")
    with pytest.raises(PermissionError):
        patched.read_bytes()
    [ev] = refusals(mnt, "/src/proj/lib/util.c")
    return ev


def test_another_user_s_refusals_cannot_use_up_the_explanations_of_others(
        mnt: Mount) -> None:  # noqa: F811
    """Refusals are explained in the events log, at most 10 a minute (explanations cost
    CPU). The bound was one for the whole mount: uid 65534 opening an unsigned file of
    its own 30 times spent it, and root's refusal a moment later was recorded with no
    explanation. The bound is per uid."""
    mine = proj(mnt) / "mine.c"
    as_user(_write, str(mine), EVIL)
    assert as_user(_open_refused_many, str(mine), 30) == 30
    ev = _root_refused_a_patched_file(mnt)
    assert ev.explanation, "root's refusal was not explained"  # type: ignore[attr-defined]


def _mkfifo_world_writable(path: str) -> None:
    os.mkfifo(path, 0o666)
    os.chmod(path, 0o666)  # past the umask: anyone may feed it


def test_a_fifo_made_before_the_policy_enforced_cannot_be_reached(
        base: Path, templates: Templates) -> None:  # noqa: F811
    """A FIFO already under a rule that needs signers when the policy starts to enforce
    (made while it was off, or imported): the kernel would serve its open and reads
    itself, so nothing could judge its bytes. It cannot be reached at all: its lookup is
    EACCES for every user, recorded with the reason."""
    m = make_mount(base, templates, policy_mode="off")
    try:
        pipe = proj(m) / "pipe"
        as_user(_mkfifo_world_writable, str(pipe))
        write_policy(base / "policy.toml", "enforce", 1)
        run("policy", "reload", str(m.path))
        assert _cat_while_fed(str(pipe)) == b""  # root's reader gets nothing of EVIL
        with pytest.raises(PermissionError):
            os.stat(pipe)
        assert errno_of(os.stat, str(pipe)) == errno.EACCES
        assert "pipe" in os.listdir(proj(m))  # still listed: only reaching it is refused
        [ev, *_] = refusals(m, "/src/proj/pipe")
        assert "FIFO" in ev.reason  # type: ignore[attr-defined]
        # Under a rule that needs nothing, the FIFO is back.
        write_policy(base / "policy.toml", "off", 1)
        run("policy", "reload", str(m.path))
        assert stat.S_ISFIFO(os.stat(pipe).st_mode)
        os.unlink(pipe)
    finally:
        stop_and_check(m)


def test_another_user_s_flood_of_refusals_cannot_push_out_the_record_of_others(
        mnt: Mount) -> None:  # noqa: F811
    """Each refused open was one line of the events log, which keeps 16 MiB: any user
    who may write under a rule could refuse themselves ~96,000 times and rotate
    everyone else's refusals out. Per uid, lines beyond a burst are counted and summed
    up in one line; root's refusal meanwhile is written as ever."""
    from annofs.daemon.events import FLOOD_BURST, read_events

    mine = proj(mnt) / "mine.c"
    as_user(_write, str(mine), EVIL)
    assert as_user(_open_refused_many, str(mine), FLOOD_BURST + 300) == FLOOD_BURST + 300
    ev = _root_refused_a_patched_file(mnt)
    assert ev.uid == 0  # type: ignore[attr-defined]
    theirs = [e for e in read_events(mnt.store) if e.uid == 65534]
    assert FLOOD_BURST <= len(theirs) <= FLOOD_BURST + 5  # a few earned back meanwhile
    stop_and_check(mnt)  # the daemon writes what it held at exit
    [summary] = [e for e in read_events(mnt.store) if e.uid == 65534
                 and "flood limit" in e.reason]
    held = int(summary.reason.split()[0])
    assert len(theirs) + held == FLOOD_BURST + 300
    assert summary.path == "/src/proj/mine.c" and summary.verdict == "refused"


def _look_up_many(d: str, n: int) -> None:
    """Make `n` files in `d` and stat each: the kernel then holds an inode for each."""
    os.mkdir(d)
    for i in range(n):
        p = f"{d}/f{i}"
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
        os.stat(p)


def _open_fifo_now(path: str) -> int:
    """Open a FIFO for reading without waiting for a writer; 0 if it opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)
    return 0


def test_a_fifo_is_out_of_reach_once_the_policy_reload_returns(
        base: Path, templates: Templates) -> None:  # noqa: F811
    """`annofs policy reload` returned while the kernel still held the names of FIFOs
    that the new policy puts out of reach: the invalidations were queued behind one for
    every inode the kernel knew, and the kernel opens a FIFO it has a name for without
    asking. With 3,000 inodes known, a FIFO opened right after the reload. The reload
    now returns once the FIFOs' names are dropped (they go first)."""
    m = make_mount(base, templates, policy_mode="off")
    try:
        pipe = proj(m) / "pipe"
        as_user(_look_up_many, str(m.path / "scratch" / "many"), 3000)
        as_user(_mkfifo_world_writable, str(pipe))  # the newest inode: queued last
        assert _open_fifo_now(str(pipe)) == 0  # reachable while the policy is off
        write_policy(base / "policy.toml", "enforce", 1)
        run("policy", "reload", str(m.path))
        assert errno_of(_open_fifo_now, str(pipe)) == errno.EACCES
        write_policy(base / "policy.toml", "off", 1)
        run("policy", "reload", str(m.path))
        os.unlink(pipe)
    finally:
        stop_and_check(m)
