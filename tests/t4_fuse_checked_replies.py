"""Large reads as checked replies (scripts/pyfuse3-checked-replies.patch): the daemon hands
pyfuse3 whole fragments with their hashes, and pyfuse3 hashes them (in its reply thread,
or inline without the GIL) before it writes a byte. A fragment damaged on the disk must
still be EIO, logged before the reader hears of it, and never a byte of it; the ranges
around it read exact; with the reply thread and inline (a one-CPU daemon, a full queue);
for root and for uid 65534 reading through --allow-other at once. And the edges the
second reader found: a large read at or past the end is end of file, and reads of huge
fragments are checked inline rather than kept in the queue."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest
from conftest import Mount, serve
from fuse_helpers import as_user, in_threads, restart_on_one_cpu, stats, stop_and_check
from store_damage import damage
from t4_fuse_reply_thread import shared_mount
from t4_fuse_trust import signed

from annofs.content.versions import fragment_starts
from annofs.daemon.mount import REPLY_THREAD_BYTES
from annofs.volume import Volume
from chunker.params import DEFAULT_PARAMS, ChunkParams

__all__ = ["shared_mount", "signed"]  # the fixtures, used by name

MIB = 1 << 20
SIZE = 6 * MIB


def _damage_middle(m: Mount) -> tuple[str, int, int]:
    """With the daemon stopped, flip a bit (in its pack, as the disk would) of the
    fragment of /pub/big that holds byte SIZE // 2; returns its hash's hex and its range."""
    m.stop()
    vol = Volume.open(m.store)
    try:
        with vol.store.read() as txn:
            v = vol.versions.get(txn, int(vol.namespace.resolve(txn, [b"pub", b"big"]).target))
            starts = fragment_starts(v)
            i = next(k for k in range(v.count) if starts[k + 1] > SIZE // 2)
            h = v.fragment_hash(i)
        damage(vol, h, "bit-flip")
        return h.hex(), starts[i], starts[i + 1]
    finally:
        vol.close()


def _reads(fd: int, data: bytes, bad: tuple[int, int]) -> list[str]:
    """Every MiB of the file behind `fd`, its cache dropped first: what a read gives is
    `data`'s bytes and never a byte of the damaged range `bad`; a read that reaches into
    it stops short before it (the pages read before the damage) and the next one fails
    with EIO; the others are whole. What went otherwise."""
    wrong: list[str] = []
    for at in range(0, SIZE, MIB):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        hits = at < bad[1] and bad[0] < at + MIB
        pos = at
        try:
            while pos < at + MIB:
                got = os.pread(fd, at + MIB - pos, pos)
                if got != data[pos:pos + len(got)]:
                    wrong.append(f"at {pos}: other bytes than the file's")
                if pos < bad[1] and bad[0] < pos + len(got):
                    wrong.append(f"at {pos}: {len(got)} bytes reaching into the damage")
                if not got:
                    wrong.append(f"at {pos}: end of file before its size")
                    break
                pos += len(got)
        except OSError as e:
            if not hits or e.errno != errno.EIO:
                wrong.append(f"at {pos}: {e}")
            continue
        if hits:
            wrong.append(f"at {at}: the damaged range read without EIO")
    return wrong


def _read_back(path: Path, data: bytes, sizes: tuple[int, ...]) -> None:
    """`path` read whole with preads of each of `sizes`, its cache dropped before each
    pass, is exactly `data`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for size in sizes:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            got = bytearray()
            while chunk := os.pread(fd, size, len(got)):
                got += chunk
            assert got == data
    finally:
        os.close(fd)


def _as_nobody(dirfd: int, data: bytes, bad: tuple[int, int], threads: int) -> list[str]:
    """As 65534: `_reads` of pub/big from `threads` threads at once."""
    wrong: list[str] = []

    def one(_: int) -> None:
        fd = os.open("big", os.O_RDONLY, dir_fd=dirfd)
        try:
            wrong.extend(_reads(fd, data, bad))
        finally:
            os.close(fd)

    in_threads(one, list(range(threads)))
    return wrong


@pytest.mark.expected_log(r"read: fragment [0-9a-f]{64}: content does not match its hash")
@pytest.mark.parametrize("where", ["reply thread", "inline on one CPU"])
def test_a_damaged_fragment_in_a_large_read_is_eio_logged_first_never_its_bytes(
        shared_mount: Mount, where: str) -> None:
    m = shared_mount
    data = random.Random(31).randbytes(SIZE)
    mine = random.Random(32).randbytes(SIZE)
    (m.path / "pub" / "big").write_bytes(data)
    (m.path / "mine").write_bytes(mine)
    name, lo, hi = _damage_middle(m)
    if where == "reply thread":
        m.start("--allow-other")
        assert stats(m)["reply_thread_bytes"] == REPLY_THREAD_BYTES
    else:
        restart_on_one_cpu(m, "--allow-other")
        assert "reply_thread_bytes" not in stats(m)  # no thread: checked inline
    assert stats(m)["checked_reply_bytes"] == REPLY_THREAD_BYTES
    # One reader first: its EIO is logged before it hears of it (the report comes first).
    fd = os.open(m.path / "pub" / "big", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as e:
            os.pread(fd, MIB, (SIZE // 2) // MIB * MIB)
        assert e.value.errno == errno.EIO
        assert any(f"read: fragment {name}: content does not match its hash" in line
                   for line in m.log_problems()), m.log_problems()
        refused = stats(m)["checked_replies_refused"]
        assert refused >= 1  # pyfuse3's check caught it, not only a retry's small read
        assert _reads(fd, data, (lo, hi)) == []
    finally:
        os.close(fd)
    # Then uid 65534 from eight threads (the queue fills: some are checked inline) while
    # root reads its own file: the damage stays EIO, root's bytes exact.
    errors: list[str] = []
    done = threading.Event()

    def root_reads() -> None:
        while not done.is_set():
            fd = os.open(m.path / "mine", os.O_RDONLY)
            try:
                errors.extend(_reads(fd, mine, (SIZE, SIZE)))
            finally:
                os.close(fd)

    dirfd = os.open(m.path / "pub", os.O_RDONLY | os.O_DIRECTORY)
    victim = threading.Thread(target=root_reads)
    victim.start()
    try:
        wrong = as_user(_as_nobody, dirfd, data, (lo, hi), 8)
    finally:
        done.set()
        victim.join()
        os.close(dirfd)
    assert wrong == []
    assert errors == []
    assert stats(m)["checked_replies_refused"] > refused
    assert all(name in line for line in m.log_problems())  # nothing else went wrong


def test_checked_replies_of_a_file_rewritten_between_reads_are_its_new_bytes(
        shared_mount: Mount) -> None:
    # A checked reply holds whole fragments of the version the read was served from:
    # after each rewrite, reads of every size around the threshold get the new bytes.
    m = shared_mount
    path = m.path / "pub" / "big"
    rng = random.Random(33)
    before = stats(m).get("replies_by_thread", 0)
    for _ in range(6):
        data = rng.randbytes(SIZE - rng.randrange(MIB))
        path.write_bytes(data)
        _read_back(path, data, (REPLY_THREAD_BYTES, MIB, 3 * MIB))
    s = stats(m)
    assert s["checked_replies_refused"] == 0
    assert s["replies_by_thread"] > before  # they went the thread's way
    stop_and_check(m)


def test_a_large_read_at_or_past_the_end_is_empty_not_an_error(signed: Mount) -> None:
    # The kernel does not clamp a direct-I/O handle's reads to the file's size: a judged
    # reader of a guarded file beside a writer gets one (trust.admission), so its large
    # reads reach the daemon at and past the end, and must be end of file, not EIO (the
    # second reader's review: an empty checked reply had been refused as malformed).
    f = signed.path / "src" / "proj" / "main.c"
    data = f.read_bytes()
    with os.fdopen(os.open(f, os.O_WRONLY), "wb", buffering=0):
        fd = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(fd, MIB, 0) == data
            for at in (len(data), len(data) + 1, len(data) + 5 * MIB):
                assert os.pread(fd, MIB, at) == b""
                assert os.pread(fd, REPLY_THREAD_BYTES - 1, at) == b""
        finally:
            os.close(fd)
    assert f.read_bytes() == data


def _queued_reads(store: Path, mp: Path, request: pytest.FixtureRequest,
                  params: ChunkParams) -> int:
    """In a new store chunked by `params`: a 12 MiB file read whole with 256 KiB and 1 MiB
    reads, the cache dropped first (bytes checked); how many replies went to the thread."""
    mp.mkdir()
    Volume.open(store, create=True, params=params).close()
    gen = serve(Mount(store, mp), request)
    m = next(gen)
    try:
        data = random.Random(34).randbytes(12 * MIB)
        (m.path / "f").write_bytes(data)
        before = stats(m)
        _read_back(m.path / "f", data, (REPLY_THREAD_BYTES, MIB))
        after = stats(m)
        assert after["checked_replies_refused"] == 0
        return after["replies_by_thread"] - before["replies_by_thread"]
    finally:
        next(gen, None)


def test_reads_of_huge_fragments_are_checked_inline_not_queued(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # A queued reply keeps its buffer, and holds a read's whole fragments: in a store
    # chunked into fragments of megabytes, eight queued 256 KiB reads would keep eight
    # such fragments' worth for good (the second reader's review). A checked reply whose
    # fragments exceed it by more than 256 KiB is checked and written inline instead:
    # only a read that happens to cover nearly whole fragments is queued.
    default = _queued_reads(tmp_path / "s1", tmp_path / "m1", request, DEFAULT_PARAMS)
    huge = _queued_reads(tmp_path / "s2", tmp_path / "m2", request,
                         ChunkParams.parse("1m/2m/4m"))
    print(f"\nreplies queued: default chunks {default}, 1m/2m/4m chunks {huge}")
    assert default >= 12
    assert huge * 4 <= default
