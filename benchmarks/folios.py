"""How the kernel caches a file: the sizes of its page-cache folios (root only).

Warm reads are copies out of the page cache, and their speed depends on the folio size:
ext4 caches a big file in folios of up to 2 MiB, while FUSE in the kernels measured here
caches in single 4 KiB pages, so every FUSE mount (annofs, pyfuse3's passthroughfs) pays
the per-page cost on warm reads. This makes that visible in the notes instead of guessed.

Method: map the file, touch each page (served from the page cache when it is warm), read
each page's frame number from /proc/self/pagemap and its flags from /proc/kpageflags; a
folio is a head page (bit 15, COMPOUND_HEAD) followed by tail pages (bit 16).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
from collections import Counter
from pathlib import Path

PAGE = mmap.PAGESIZE
_TAIL = 1 << 16
_PFN_MASK = (1 << 55) - 1


def folio_sizes(path: Path, limit: int = 256 << 20, *,
                largest: bool = False) -> Counter[int] | None:
    """{folio size in bytes: bytes of the first `limit` bytes of `path` cached in such
    folios}, or None when the kernel does not let us see (not root, no /proc/kpageflags).

    `largest`: first drop those bytes from the cache (POSIX_FADV_DONTNEED) and fault them
    back through a mapping advised MADV_HUGEPAGE, which asks for PMD-sized (2 MiB) folios
    wherever the file's mapping allows them: what is then cached shows the largest folios
    the kernel will use for this file at all, whatever its reads or its daemon do."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = min(os.fstat(fd).st_size, limit) // PAGE * PAGE
        if size == 0:
            return Counter()
        if largest:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if largest:
            m.madvise(mmap.MADV_HUGEPAGE)
    finally:
        os.close(fd)
    try:
        buf = ctypes.c_char.from_buffer(m)
        try:
            addr = ctypes.addressof(buf)
            for off in range(0, size, PAGE):
                m[off]  # fault the page in (read only: the private mapping is not copied)
            npages = size // PAGE
            with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
                entries = struct.unpack(f"{npages}Q", os.pread(pm.fileno(), npages * 8,
                                                               addr // PAGE * 8))
                runs: Counter[int] = Counter()
                current = 0
                for e in entries:
                    flags = struct.unpack("Q", os.pread(kf.fileno(), 8, (e & _PFN_MASK) * 8))[0]
                    if flags & _TAIL and current:
                        current += 1
                        continue
                    if current:
                        runs[current * PAGE] += current * PAGE
                    current = 1
                if current:
                    runs[current * PAGE] += current * PAGE
                return runs
        finally:
            del buf
    except OSError:
        return None
    finally:
        with contextlib.suppress(BufferError):
            m.close()


def describe(runs: Counter[int] | None) -> str:
    """'97% in 2048 KiB folios, 3% in 4 KiB' (the largest shares first)."""
    if runs is None:
        return "not measurable here"
    total = sum(runs.values()) or 1
    parts = [f"{100 * n / total:.0f}% in {size // 1024} KiB folios"
             for size, n in sorted(runs.items(), key=lambda kv: -kv[1]) if n / total >= 0.01]
    return ", ".join(parts) or "nothing cached"
