"""Large read replies written by a thread of their own (scripts/pyfuse3-reply-thread.patch,
REPLY_THREAD_BYTES): what a reader gets stays exact with several readers at once, with
the page cache dropped under them, and across rewrites; small replies and a daemon on
one CPU write inline; a hostile user's many large reads leave root's bytes exact and the
daemon's memory bounded (at most 8 replies wait)."""

from __future__ import annotations

import mmap
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd, serve
from fuse_helpers import as_user, in_threads, restart_on_one_cpu, rss, stats, stop_and_check

from annofs.daemon.mount import REPLY_THREAD_BYTES

MIB = 1 << 20


def _uncache(path: Path) -> None:
    """The kernel's cached pages of one file of the mount dropped: its next reads go to
    the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _uncached_pass(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """One pass over the whole file behind `fd`, its cached pages dropped first (so the
    reads go to the daemon): (offset, bytes) of each `size`-byte pread up to its end."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    at = 0
    while chunk := os.pread(fd, size, at):
        yield at, chunk
        at += len(chunk)


def _by_thread(m: Mount) -> tuple[int, int, int]:
    s = stats(m)
    return (s["replies_by_thread"], s["replies_by_thread_refused"],
            s["replies_inline_queue_full"])


def test_concurrent_large_reads_come_back_exact_through_the_reply_thread(
        mounted: Mount) -> None:
    assert stats(mounted)["reply_thread_bytes"] == REPLY_THREAD_BYTES
    rng = random.Random(5)
    files = {mounted.path / f"big{i}": rng.randbytes(6 * MIB + 4321 * i) for i in range(4)}
    for path, data in files.items():
        path.write_bytes(data)
    written_before, _, _ = _by_thread(mounted)
    errors: list[str] = []

    def reader(path: Path, data: bytes, seed: int) -> None:
        r = random.Random(seed)
        with open(path, "rb", buffering=0) as f:
            for _ in range(3):  # whole-file passes, the cache dropped before each
                _uncache(path)
                got = bytearray()
                while chunk := f.read(MIB):
                    got += chunk
                f.seek(0)
                if got != data:
                    errors.append(f"{path.name}: a whole read differs")
            for _ in range(40):  # ranges of every size around the threshold
                _uncache(path)
                size = r.choice([1, 4096, REPLY_THREAD_BYTES - 1, REPLY_THREAD_BYTES,
                                 REPLY_THREAD_BYTES + 1, MIB, 3 * MIB])
                at = r.randrange(0, len(data))
                if os.pread(f.fileno(), size, at) != data[at:at + size]:
                    errors.append(f"{path.name}: {size} bytes at {at} differ")

    in_threads(lambda job: reader(*job), [(p, d, i) for i, (p, d) in enumerate(files.items())])
    assert errors == []
    written, refused, _ = _by_thread(mounted)
    # Each uncached 6 MiB pass alone sends several replies of a MiB or so.
    assert written - written_before >= 4 * 3 * 4
    assert refused == 0
    stop_and_check(mounted)


def test_a_file_rewritten_between_large_reads_is_read_new(mounted: Mount) -> None:
    f = mounted.path / "f"
    rng = random.Random(9)
    reader = os.open(f, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        for round_ in range(6):
            data = rng.randbytes(4 * MIB + round_)
            with open(f, "r+b") as w:  # another handle rewrites it while `reader` is open
                w.write(data)
                w.truncate()
            # Large reads right after the writer's close: never the previous content.
            assert os.pread(reader, len(data) + 1, 0) == data
            assert f.read_bytes() == data
    finally:
        os.close(reader)
    stop_and_check(mounted)


def test_small_replies_and_a_one_cpu_daemon_write_inline(mounted: Mount) -> None:
    small = mounted.path / "small"
    small.write_bytes(os.urandom(REPLY_THREAD_BYTES // 2))
    before = _by_thread(mounted)
    for _ in range(10):
        _uncache(small)
        small.read_bytes()
    assert _by_thread(mounted) == before  # below the threshold: inline
    big = mounted.path / "big"
    data = os.urandom(4 * MIB)
    big.write_bytes(data)
    restart_on_one_cpu(mounted)
    assert "reply_thread_bytes" not in stats(mounted)
    assert big.read_bytes() == data
    assert _by_thread(mounted) == (0, 0, 0)  # a new daemon: nothing went to the thread
    stop_and_check(mounted)


@pytest.fixture
def shared_mount(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mount]:
    """A fresh store mounted --allow-other, with /pub owned by 65534."""
    store, mp = tmp_path / "store", tmp_path / "mnt"
    mp.mkdir()
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   stdout=subprocess.DEVNULL)
    gen = serve(Mount(store, mp), request, "--allow-other")
    m = next(gen)
    (m.path / "pub").mkdir()
    os.chown(m.path / "pub", 65534, 65534)
    yield m
    next(gen, None)


def _hostile_reads(dirfd: int, names: list[str], rounds: int) -> int:
    """As 65534: read every file whole, the cache dropped before each, `rounds` times,
    from as many threads as files. Bytes read."""
    total = 0
    lock = threading.Lock()

    def one(name: str) -> None:
        nonlocal total
        fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
        try:
            for _ in range(rounds):
                got = sum(len(chunk) for _, chunk in _uncached_pass(fd, 4 * MIB))
                with lock:
                    total += got
        finally:
            os.close(fd)

    in_threads(one, names)
    return total


def test_a_hostile_users_many_large_reads_leave_roots_bytes_exact_and_memory_bounded(
        shared_mount: Mount) -> None:
    m = shared_mount
    names = [f"h{i}" for i in range(12)]
    for n in names:
        (m.path / "pub" / n).write_bytes(os.urandom(8 * MIB))
    mine = os.urandom(8 * MIB)
    (m.path / "mine").write_bytes(mine)
    rss_before = rss(m)
    dirfd = os.open(m.path / "pub", os.O_RDONLY | os.O_DIRECTORY)
    errors: list[str] = []
    done = threading.Event()

    def root_reads() -> None:
        while not done.is_set():
            _uncache(m.path / "mine")
            if (m.path / "mine").read_bytes() != mine:
                errors.append("root read other bytes than its file's")

    victim = threading.Thread(target=root_reads)
    victim.start()
    try:
        got = as_user(_hostile_reads, dirfd, names, 4)
    finally:
        done.set()
        victim.join()
        os.close(dirfd)
    assert got == 12 * 4 * 8 * MIB
    assert errors == []
    written, refused, full = _by_thread(m)
    print(f"\nreplies by the thread {written}, refused {refused}, inline (queue full) {full}; "
          f"daemon RSS {rss_before / MIB:.0f} -> {rss(m) / MIB:.0f} MiB")
    assert refused == 0
    # 8 queued replies of at most max_read (1 MiB) each, and what they were copied from.
    assert rss(m) - rss_before < 64 * MIB
    stop_and_check(m)


# -- the second reader's scenarios (review of the reply thread) ---------------------------

ROUNDS = 12
RACE_SIZE = 8 * MIB


def _race_reads(dirfd: int, truncated: bool) -> tuple[int, list[str]]:
    """As 65534, until root creates `stop`: read `f` (every byte one of the round values
    1..ROUNDS) and `g` (all 0xEE) whole, over and over, the cache dropped before each
    pass, from pread threads and, unless `f` is being `truncated`, threads reading through
    a shared mapping (which cannot read past a truncated end: SIGBUS). (Passes, and what
    was wrong.)

    Where `f` is truncated and rewritten, a read racing the truncate can also see zeros:
    the kernel zero-fills a READ answered short once the size it knew has changed, in any
    FUSE filesystem (SECURITY.md 17: fuse-overlayfs, in C, showed it too). Zeros are
    allowed there, nothing else: no byte of another file or of no round."""
    allowed = {"f": bytes(range(1, ROUNDS + 1)) + (b"\x00" if truncated else b""),
               "g": b"\xee"}
    bad: list[str] = []
    passes = 0
    lock = threading.Lock()

    def stopped() -> bool:
        try:
            os.stat("stop", dir_fd=dirfd)
            return True
        except FileNotFoundError:
            return False

    def check(name: str, data: bytes, at: int) -> None:
        stray = data.translate(None, allowed[name])
        if stray:
            with lock:
                bad.append(f"{name}: byte {stray[0]:#x} in {len(data)} bytes at {at}")

    def by_pread(name: str) -> None:
        nonlocal passes
        fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
        try:
            while not stopped():
                for at, chunk in _uncached_pass(fd, MIB):
                    check(name, chunk, at)
                with lock:
                    passes += 1
        finally:
            os.close(fd)

    def by_mmap(name: str) -> None:
        nonlocal passes
        fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
        try:
            with mmap.mmap(fd, RACE_SIZE, prot=mmap.PROT_READ) as mm:
                while not stopped():
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    for at in range(0, RACE_SIZE, MIB):
                        check(name, mm[at:at + MIB], at)
                    with lock:
                        passes += 1
        finally:
            os.close(fd)

    targets = [(by_pread, "f"), (by_pread, "f"), (by_pread, "g")]
    if not truncated:
        targets += [(by_mmap, "f"), (by_mmap, "g")]
    in_threads(lambda target: target[0](target[1]), targets)
    return passes, bad


@pytest.mark.parametrize("truncate", [False, True], ids=["in-place", "truncated"])
def test_rewrites_racing_queued_replies_leave_no_stale_or_foreign_page(
        shared_mount: Mount, truncate: bool) -> None:
    m = shared_mount
    pub = m.path / "pub"
    (pub / "f").write_bytes(bytes([1]) * RACE_SIZE)
    (pub / "g").write_bytes(b"\xee" * RACE_SIZE)
    for name in ("f", "g"):
        os.chown(pub / name, 65534, 65534)
    written_before, _, _ = _by_thread(m)
    dirfd = os.open(pub, os.O_RDONLY | os.O_DIRECTORY)
    stale: list[str] = []

    def writer() -> None:
        try:
            for k in range(2, ROUNDS + 1):
                with open(pub / "f", "r+b") as w:
                    if truncate:
                        w.truncate(0)
                    for at in range(0, RACE_SIZE, MIB):
                        w.seek(at)
                        w.write(bytes([k]) * MIB)
                # Once the writer closed, no page of an earlier round may be served.
                got = (pub / "f").read_bytes()
                if got != bytes([k]) * RACE_SIZE:
                    stale.append(f"round {k}: {len(got)} bytes, values {sorted(set(got))}")
        finally:
            (pub / "stop").touch()

    w = threading.Thread(target=writer)
    w.start()
    try:
        passes, bad = as_user(_race_reads, dirfd, truncate)
    finally:
        w.join()
        os.close(dirfd)
    assert stale == []
    assert bad == []
    assert passes >= 3
    written, refused, _ = _by_thread(m)
    assert written > written_before and refused == 0
    stop_and_check(m)


def _read_until_gone(dirfd: int, names: list[str], want: dict[str, bytes]) -> list[str]:
    """As 65534: read the files whole over and over, the cache dropped before each pass,
    until the mount goes away (an error). What came back wrong."""
    wrong: list[str] = []

    def one(name: str) -> None:
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
        except OSError:
            return
        try:
            while True:
                for at, chunk in _uncached_pass(fd, MIB):
                    if chunk != want[name][at:at + len(chunk)]:
                        wrong.append(f"{name}: {len(chunk)} bytes at {at}")
        except OSError:
            return  # the mount went away (ENOTCONN, EIO)
        finally:
            os.close(fd)

    in_threads(one, names)
    return wrong


def test_sigterm_with_replies_queued_exits_cleanly_and_loses_nothing(
        shared_mount: Mount) -> None:
    m = shared_mount
    names = [f"s{i}" for i in range(10)]
    want = {n: os.urandom(6 * MIB) for n in names}
    for n, data in want.items():
        (m.path / "pub" / n).write_bytes(data)
    dirfd = os.open(m.path / "pub", os.O_RDONLY | os.O_DIRECTORY)
    result: list[list[str]] = []
    readers = threading.Thread(target=lambda: result.append(
        as_user(_read_until_gone, dirfd, names, want)))
    readers.start()
    try:
        before = _by_thread(m)[0]
        deadline = time.monotonic() + 20
        while _by_thread(m)[0] < before + 50:  # replies are going through the thread
            assert time.monotonic() < deadline, "no replies went through the thread"
            time.sleep(0.05)
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        m.proc.wait(timeout=10)  # the queue drained: no hang at close
    finally:
        readers.join(timeout=60)
        os.close(dirfd)
    assert result == [[]]
    log = (m.store / "daemon.log").read_text()
    assert re.search(r"unmounted .* \(clean\)", log.splitlines()[-1] if log else "")
    m.proc = None
    m.start("--allow-other")
    for n, data in want.items():
        assert (m.path / "pub" / n).read_bytes() == data
    stop_and_check(m)
