"""Access-pattern advice for the LMDB map: random access for small, scattered work.

The store is opened with readahead on: a page fault then reads the whole readahead window
around the page (`read_ahead_kb` of the disk: 8 MiB on this machine's virtio disk), which
is what sequential reads of imported files want, since their fragments lie one after the
other. A one-byte edit wants the opposite: it touches a few B-tree pages and fragments
scattered over the file, and each of those faults read 8 MiB (measured: 7 faults, 50 MB
and ~40 ms of a cold 1-byte edit in a 1 GiB file). Inside `random_access` the map is
advised MADV_RANDOM, so a fault reads its page alone (the same edit: ~25 faults of 4 KiB,
~7 ms); outside it, MADV_NORMAL as LMDB set it. Advice changes only what the kernel reads
ahead, never what a read returns: a concurrent reader is at worst slower meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from annofs.store.env import Store

log = logging.getLogger("annofs.store")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def find_map(data_file: Path, maps: Path = Path("/proc/self/maps")) -> tuple[int, int] | None:
    """(address, length) of this process's mapping of `data_file`, found by inode."""
    try:
        st = os.stat(data_file)
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(st.st_ino) \
                and fields[5] == str(data_file.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            return lo, hi - lo
    return None


class MapAdvice:
    """Counts the users of random access; the map is advised MADV_RANDOM while any is in."""

    def __init__(self, store: Store) -> None:
        self._map = find_map(Path(store.path) / "db" / "data.mdb")
        if self._map is None:
            log.info("%s: LMDB map not found; no access-pattern advice", store.path)
        self._lock = threading.Lock()
        self._users = 0

    def _advise(self, advice: int) -> None:
        if self._map is not None and _libc.madvise(self._map[0], self._map[1], advice) != 0:
            log.info("madvise(%d) of the LMDB map failed: %s; no more advice", advice,
                     os.strerror(ctypes.get_errno()))
            self._map = None

    @contextlib.contextmanager
    def random_access(self) -> Iterator[None]:
        """Fault single pages (no readaround) until the block ends."""
        with self._lock:
            if self._users == 0:
                self._advise(mmap.MADV_RANDOM)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._advise(mmap.MADV_NORMAL)


_ADVICE: weakref.WeakKeyDictionary[Store, MapAdvice] = weakref.WeakKeyDictionary()
_ADVICE_LOCK = threading.Lock()


def random_access(store: Store) -> contextlib.AbstractContextManager[None]:
    """`MapAdvice.random_access` for the store's map (found once per open store)."""
    with _ADVICE_LOCK:
        advice = _ADVICE.get(store)
        if advice is None:
            advice = _ADVICE[store] = MapAdvice(store)
    return advice.random_access()
