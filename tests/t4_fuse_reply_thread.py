"""Large read replies written by a thread of their own (scripts/pyfuse3-reply-thread.patch,
REPLY_THREAD_BYTES): what a reader gets stays exact with several readers at once, with
the page cache dropped under them, and across rewrites; small replies and a daemon on
one CPU write inline; a hostile user's many large reads leave root's bytes exact and the
daemon's memory bounded (at most 8 replies wait)."""

from __future__ import annotations

import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd, serve
from fuse_helpers import as_user, rss, stats, stop_and_check

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

    threads = [threading.Thread(target=reader, args=(p, d, i))
               for i, (p, d) in enumerate(files.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
    mounted.stop()
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # the daemon inherits it
    try:
        mounted.start()
    finally:
        os.sched_setaffinity(0, allowed)
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
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                at = 0
                while chunk := os.pread(fd, 4 * MIB, at):
                    at += len(chunk)
                with lock:
                    total += at
        finally:
            os.close(fd)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
