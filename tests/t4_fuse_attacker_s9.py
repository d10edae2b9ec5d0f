"""Session 9's three changes attacked by a hostile local user (uid 65534 through
`--allow-other`) on t4_fuse_symlinks's fixture (a signed /src/proj, an unguarded
/scratch, both owned by 65534):

- disk reads in DISK_READ_THREADS worker threads: can 65534's cold reads of big files
  hold them and stall root's reads or other requests?
- the polling request loop (200 us without the GIL once idle): can 65534 make the daemon
  burn CPU, or delay the control socket?
- no FLUSH at a reader's close: does a reader's close change what the next open sees?

Each test measures and prints its figure (run with -s to see them)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Mount, annofs_cmd
from fuse_helpers import as_user, cpu_seconds, restart_on_one_cpu
from t4_fuse_symlinks import (  # noqa: F401  (fixtures)
    base,
    mnt,
    proj,
)

from annofs.daemon.mount import FUSE_SPIN_NS
from annofs.store.packs import packs_dir

MIB = 1 << 20


def _drop_caches() -> None:
    """Every clean page out of the page cache: the store's packs must come from the disk.
    (The kernel's cached pages of the mount's files go too.)"""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _write_random(path: str, size: int) -> str:
    """`size` incompressible bytes (nothing deduplicated, nothing compressed away); their
    SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MIB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _read_all(path: str) -> str:
    """Read a file to its end in 1 MiB reads; the SHA-256 of what was read."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


# -- disk-read threads -------------------------------------------------------------------------


def test_cold_reads_of_big_files_do_not_stall_another_user_s_small_read(
        mnt: Mount) -> None:  # noqa: F811
    """uid 65534 reads six cold 48 MiB files of its own at once (the kernel's readahead
    sends several 1 MiB READs of each, every one a disk read for a worker thread); root
    meanwhile reads a small cold file and looks up a new name. Every byte the threads
    read is the one written. Root's read waits behind
    the attacker's queued READs for a thread: bounded by a few of them, not by the
    attacker's whole reads."""
    scratch = mnt.path / "scratch"
    big = [str(scratch / f"big{i}") for i in range(6)]
    sums = [as_user(_write_random, p, 48 * MIB) for p in big]
    small = scratch / "small"
    small.write_bytes(os.urandom(256 << 10))
    _drop_caches()
    alone = _timed(lambda: small.read_bytes())
    _drop_caches()
    read: dict[str, str] = {}
    readers = [threading.Thread(target=lambda p=p: read.__setitem__(p, as_user(_read_all, p)))
               for p in big]
    t0 = time.monotonic()
    for t in readers:
        t.start()
    try:
        time.sleep(0.3)
        beside = _timed(lambda: small.read_bytes())
        lookup = _timed(lambda: (scratch / "nothing-here").exists())
    finally:
        for t in readers:
            t.join(120)
    attack = time.monotonic() - t0
    print(f"\nroot's cold 256 KiB read: alone {alone * 1000:.0f} ms, beside 65534's six cold "
          f"48 MiB reads {beside * 1000:.0f} ms; lookup {lookup * 1000:.1f} ms; the "
          f"attacker's reads took {attack:.2f} s; load {os.getloadavg()[0]:.1f}")
    assert [read.get(p) for p in big] == sums  # the threads' reads are the bytes written
    assert beside < max(1.0, 10 * alone), f"root's small read waited {beside:.2f} s"
    assert lookup < 0.5, f"root's lookup waited {lookup:.2f} s"


# -- the polling loop --------------------------------------------------------------------------


def _paced_requests(path: str, seconds: float, gap: float) -> int:
    """getxattr (never cached by the kernel: each one a request) every `gap` seconds
    (busy-waited: sleeps are coarser than the 200 us poll); how many were sent."""
    n = 0
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        with contextlib.suppress(OSError):
            os.getxattr(path, "user.none")
        n += 1
        next_at = now + gap
        while time.monotonic() < next_at:
            pass
    return n


def _paced_cpu(pid: int, target: str, gap: float) -> tuple[float, int]:
    """The daemon's CPU per request while uid 65534 sends one every `gap` seconds for
    1.5 s (0: back to back), and how many it sent."""
    c0 = cpu_seconds(pid)
    n = as_user(_paced_requests, target, 1.5, gap)
    return (cpu_seconds(pid) - c0) / n, n


def test_paced_requests_burn_at_most_the_poll_per_request(mnt: Mount) -> None:  # noqa: F811
    """The loop polls /dev/fuse for up to 200 us after each request when idle. uid 65534
    sends one cheap request every 300 us and every 1 ms (past the poll: every one pays
    it in full): the daemon's CPU per request is the poll (and 100 us) at most above
    what the same daemon costs without it (started on one CPU, where it never polls),
    not the whole gap, and idle the
    daemon burns nothing. (A cost, not a bug: at 1,000 requests/s, 5x the CPU of the
    requests back to back.)"""
    assert mnt.proc is not None
    target = str(mnt.path / "scratch" / "evil.c")
    c0 = cpu_seconds(mnt.proc.pid)
    time.sleep(1.0)
    idle = cpu_seconds(mnt.proc.pid) - c0
    assert idle < 0.05, f"the idle daemon burned {idle:.2f} s of CPU in 1 s"
    gaps = (0.0, 300e-6, 1e-3)
    polling = {gap: _paced_cpu(mnt.proc.pid, target, gap) for gap in gaps}
    # The same daemon without the poll: a request that finds it asleep pays the epoll
    # wait and trio's wake-up (~250 us here), which is not the poll's doing.
    restart_on_one_cpu(mnt, "--allow-other", "--policy", str(mnt.store.parent / "policy.toml"))
    assert mnt.proc is not None
    plain = {gap: _paced_cpu(mnt.proc.pid, target, gap) for gap in gaps}
    print(f"\nidle 1 s: {idle * 1000:.0f} ms CPU; load {os.getloadavg()[0]:.1f}")
    for gap in gaps:
        (paced, n), (bare, _) = polling[gap], plain[gap]
        print(f"every {gap * 1e6:.0f} us: {n / 1.5:.0f} req/s at {paced * 1e6:.0f} us CPU "
              f"each; without the poll {bare * 1e6:.0f} us")
    for gap in gaps[1:]:
        (paced, n), (bare, _) = polling[gap], plain[gap]
        # The 200 us poll and 100 us for what else differs between the two daemons (one
        # CPU against two: measured 175-229 us above it in all), with clock-tick (10 ms)
        # slack for each of the two measures. A poll that did not end would cost the
        # whole gap.
        assert paced <= bare + FUSE_SPIN_NS / 1e9 + 100e-6 + 0.04 / n, (
            f"{paced * 1e6:.0f} us per request, {bare * 1e6:.0f} without the poll")


def test_the_control_socket_answers_while_requests_keep_the_loop_polling(
        mnt: Mount) -> None:  # noqa: F811
    """Two uid 65534 processes send requests every 150 us (each reply followed by the
    poll finding the next one): `annofs policy reload` by root is answered as fast as
    on an idle mount (the loop checkpoints every 16 requests)."""
    target = str(mnt.path / "scratch" / "evil.c")
    cmd = annofs_cmd("policy", "reload", str(mnt.path))

    def reload() -> float:
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return time.monotonic() - t0

    idle = min(reload() for _ in range(3))
    attackers = [threading.Thread(target=as_user, args=(_paced_requests, target, 5.0, 150e-6))
                 for _ in range(2)]
    for t in attackers:
        t.start()
    try:
        time.sleep(0.5)
        busy = max(reload() for _ in range(3))
    finally:
        for t in attackers:
            t.join(60)
    print(f"\npolicy reload: idle {idle * 1000:.0f} ms, under two paced attackers (slowest "
          f"of 3) {busy * 1000:.0f} ms; load {os.getloadavg()[0]:.1f}")
    assert busy < idle + 2.0, f"reload took {busy:.2f} s (idle {idle:.2f} s)"


# -- no FLUSH at a reader's close ----------------------------------------------------------------


def _reader_closes_then_writer_appends(path: str, rounds: int) -> list[str]:
    """A writer holding the file open appends a line, a reader opens, reads and closes
    (no FLUSH), the writer closes; each round a fresh reader must see every line so
    far. Mismatches returned."""
    bad: list[str] = []
    expect = Path(path).read_bytes()
    for i in range(rounds):
        line = f"line {i}\n".encode()
        w = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(w, line)
            r = os.open(path, os.O_RDONLY)
            os.read(r, 1 << 20)
            os.close(r)  # the reader's close: no FLUSH
            os.fsync(w)
        finally:
            os.close(w)  # the writer's: FLUSH, the commit
        expect += line
        got = Path(path).read_bytes()
        if got != expect:
            bad.append(f"round {i}: {len(got)} bytes, expected {len(expect)}")
    return bad


def test_a_reader_s_close_without_flush_loses_no_write_of_another_handle(
        mnt: Mount) -> None:  # noqa: F811
    """Close-to-open with readers that no longer FLUSH: a writer and readers of the same
    file interleaved, as uid 65534, the file read cold between rounds too."""
    f = mnt.path / "scratch" / "log"
    as_user(lambda: f.write_bytes(b"start\n"))
    assert as_user(_reader_closes_then_writer_appends, str(f), 200) == []
    _drop_caches()
    want = b"start\n" + b"".join(f"line {i}\n".encode() for i in range(200))
    assert f.read_bytes() == want


def _append_lines(path: str, seconds: float) -> int:
    """Append numbered lines (no NUL byte) for `seconds`, the file held open; lines."""
    n = 0
    end = time.monotonic() + seconds
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        while time.monotonic() < end:
            os.write(fd, f"{n:08d} {'x' * 50}\n".encode())
            n += 1
            if n % 64 == 0:
                os.close(fd)  # a commit now and then: the readers' cold reads are of it
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    finally:
        os.close(fd)
    return n


def _read_for_nul(path: str, seconds: float) -> list[str]:
    """Open, read whole, close, over and over: where a NUL byte was seen (never written)."""
    bad: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(bad) < 5:
        with open(path, "rb") as f:
            size_at_open = os.fstat(f.fileno()).st_size
            data = f.read()
        if bytes(1) in data:
            runs = [(m.start(), m.end()) for m in re.finditer(rb"\0+", data)]
            bad.append(f"NUL runs {runs} of {len(data)} bytes read, {size_at_open} at open")
    return bad


def _evict_packs(store: Path, seconds: float) -> None:
    """Drop the store's pack pages from the page cache every millisecond: the readers'
    READs go to the disk threads, and wait there."""
    end = time.monotonic() + seconds
    packs = [p for p in packs_dir(store).rglob("*") if p.is_file()]
    while time.monotonic() < end:
        for p in packs:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        time.sleep(0.001)
        packs = [p for p in packs_dir(store).rglob("*") if p.is_file()]


def test_an_appended_log_read_cold_while_written_shows_no_zeros(mnt: Mount) -> None:  # noqa: F811
    """uid 65534 appends to a log in /scratch (closing now and then: commits); readers
    (root and 65534) read it whole over and over while the store's pages are dropped, so
    their READs wait in disk threads as the appends land. No reader may see bytes nobody
    wrote. Failed before readers were pinned only where a rule needs signers: 'NUL runs
    [(3840, 3960)] of 4020 bytes read, 3900 at open': a reader pinned to the version it
    was judged on answered its READs short, beside a writer whose appends had grown the
    file, and the kernel filled the rest of the shared page with zeros."""
    log = mnt.path / "scratch" / "log"
    as_user(lambda: log.write_bytes(b""))
    threads = [threading.Thread(target=as_user, args=(_append_lines, str(log), 4.0)),
               threading.Thread(target=_evict_packs, args=(mnt.store, 4.0))]
    for t in threads:
        t.start()
    try:
        bad = _read_for_nul(str(log), 4.0)
        bad_nobody = as_user(_read_for_nul, str(log), 1.0)
    finally:
        for t in threads:
            t.join(60)
    assert bad == [] and bad_nobody == []


def test_an_appended_log_read_while_written_shows_no_zeros_without_a_policy(
        mounted: Mount) -> None:
    """The same on a mount without a policy (nobody pinned, nothing judged): the READs
    that wait in a disk thread while appends land (the lock check in `read` comes before
    that wait) put no zeros in the kernel's cache."""
    log = mounted.path / "log"
    log.write_bytes(b"")
    threads = [threading.Thread(target=_append_lines, args=(str(log), 3.0)),
               threading.Thread(target=_evict_packs, args=(mounted.store, 3.0))]
    for t in threads:
        t.start()
    try:
        bad = _read_for_nul(str(log), 3.0)
    finally:
        for t in threads:
            t.join(60)
    assert bad == []


def _mapped_writes_beside_readers(path: str) -> list[str]:
    """A writer maps the file MAP_SHARED, closes its descriptor and goes on writing
    through the mapping while readers open, read and close (no FLUSH any more: the
    reader's close used to write the mapping's dirty pages back). Mismatches returned."""
    import mmap
    bad: list[str] = []
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 1 << 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)  # FLUSH and RELEASE come later: the mapping holds the file
    for i in range(64):
        m[i * 1024:(i + 1) * 1024] = bytes([65 + i % 26]) * 1024
        r = os.open(path, os.O_RDONLY)
        got = os.pread(r, 1024, i * 1024)
        os.close(r)
        if got != bytes([65 + i % 26]) * 1024:
            bad.append(f"block {i}: a reader read {got[:8]!r}")
    m.close()  # munmap: the dirty pages written back
    return bad


def test_a_shared_mapping_s_writes_survive_readers_closing_beside_it(
        mnt: Mount) -> None:  # noqa: F811
    """uid 65534's MAP_SHARED writer, its descriptor closed, writes while readers close
    without FLUSH: every block reaches readers, and the store once the mapping is gone
    (read cold: caches dropped)."""
    f = mnt.path / "scratch" / "mapped"
    as_user(lambda: f.write_bytes(bytes(1 << 16)))
    assert as_user(_mapped_writes_beside_readers, str(f)) == []
    _drop_caches()
    want = b"".join(bytes([65 + i % 26]) * 1024 for i in range(64))
    assert f.read_bytes() == want
