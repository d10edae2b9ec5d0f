"""annofs.store.warm: a store's files read into the page cache, index first, bounded."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

from annofs.store.warm import available_bytes, warm, warm_order, warm_plan

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
PAGE = mmap.PAGESIZE


def _layout(root: Path, packs: dict[str, int]) -> None:
    """A store's file layout: db/data.mdb and packs/NAME with the given mtimes."""
    (root / "db").mkdir(parents=True)
    (root / "db" / "data.mdb").write_bytes(os.urandom(3 * PAGE))
    (root / "packs").mkdir()
    for name, mtime in packs.items():
        p = root / "packs" / name
        p.write_bytes(os.urandom(5 * PAGE))
        os.utime(p, ns=(mtime, mtime))


def _resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache: mincore of a read-only mapping of it."""
    size = path.stat().st_size
    pages = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ, mmap.MAP_SHARED, fd,
                          ctypes.c_long(0))
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        finally:
            _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_the_index_comes_first_then_packs_oldest_first(tmp_path: Path) -> None:
    _layout(tmp_path, {"new.pack": 3_000_000_000, "old.pack": 1_000_000_000,
                       "open-7.pack": 2_000_000_000})
    (tmp_path / "packs" / "leftover.tmp").write_bytes(b"x")  # not a pack: not read
    names = [p.name for p in warm_order(tmp_path)]
    assert names == ["data.mdb", "old.pack", "open-7.pack", "new.pack"]


def test_warming_puts_the_files_in_the_page_cache(tmp_path: Path) -> None:
    _layout(tmp_path, {"a.pack": 1})
    paths = warm_order(tmp_path)
    for p in paths:
        _evict(p)
    assert _resident_pages(paths[1]) < 5  # the eviction worked: the check can fail
    assert warm(paths, 1 << 30, threading.Event()) == (3 + 5) * PAGE
    assert [_resident_pages(p) for p in paths] == [3, 5]


def test_the_budget_bounds_what_is_read(tmp_path: Path) -> None:
    _layout(tmp_path, {"a.pack": 1, "b.pack": 2})
    paths = warm_order(tmp_path)
    assert warm(paths, 4 * PAGE + 10, threading.Event()) == 4 * PAGE + 10


def test_a_stopped_warming_reads_nothing_and_a_missing_file_is_passed_over(
        tmp_path: Path) -> None:
    _layout(tmp_path, {"a.pack": 1})
    stop = threading.Event()
    stop.set()
    assert warm(warm_order(tmp_path), 1 << 30, stop) == 0
    paths = warm_order(tmp_path)
    (tmp_path / "db" / "data.mdb").unlink()  # gone meanwhile (as gc can take a pack)
    assert warm(paths, 1 << 30, threading.Event()) == 5 * PAGE


def test_available_memory_is_read_and_a_missing_meminfo_gives_zero(tmp_path: Path) -> None:
    assert available_bytes() > 0
    assert available_bytes(tmp_path / "nothing") == 0


def test_packs_are_read_only_when_the_whole_store_fits_the_budget(tmp_path: Path) -> None:
    _layout(tmp_path, {"a.pack": 1, "b.pack": 2})
    paths = warm_order(tmp_path)
    whole = sum(p.stat().st_size for p in paths)
    assert warm_plan(paths, whole) == paths
    assert [p.name for p in warm_plan(paths, whole - 1)] == ["data.mdb"]
