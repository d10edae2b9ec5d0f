"""An open regular file: the version it started from plus the bytes written since.

Writes land in a DirtyOverlay; a commit (flush, fsync, release) re-chunks only around
the dirty bytes and stores a new version whose parent is the previous one. A long write
that outgrows SPILL_BYTES is turned into fragments early, without a version, so memory
stays bounded however much is written before the close.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import trio

from annofs.content.overlay import DirtyOverlay
from annofs.content.rewrite import Rewrite, rewrite
from annofs.store.records import Version
from annofs.volume import Volume

SPILL_BYTES = 64 << 20
# Below this much dirty data, re-chunking inline is cheaper than a thread hand-off
# (~50-100 us) and keeps small-file workloads on the event loop.
INLINE_BYTES = 1 << 20


@dataclass
class OpenFile:
    """Live content of an open file: `base` (committed or spilled) + `overlay`."""

    base: Version
    parent_version: int  # the stored version the next commit derives from
    overlay: DirtyOverlay
    lock: trio.Lock = field(default_factory=trio.Lock)
    mtime_ns: int | None = None  # set by writes, written with the next commit

    @classmethod
    def of(cls, v: Version) -> OpenFile:
        """The open state of a file whose current version is `v`."""
        return cls(v, v.id, DirtyOverlay(v.size))

    @property
    def size(self) -> int:
        return self.overlay.size

    @property
    def dirty(self) -> bool:
        return bool(self.overlay) or self.base.id != self.parent_version

    def read(self, vol: Volume, offset: int, size: int) -> bytes:
        """Bytes of the live content, short at EOF."""
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        if not self.overlay:
            return vol.versions.read_snapshot(self.base, offset, end - offset)
        buf = bytearray(end - offset)
        base_n = max(0, min(end, self.overlay.base_visible(self.base.size)) - offset)
        if base_n > 0:
            buf[:base_n] = vol.versions.read_snapshot(self.base, offset, base_n)
        self.overlay.overlay(offset, buf)
        return bytes(buf)


# New fragments are stored this much per transaction: LMDB has one writer at a time, so
# a request on the event loop that writes waits for at most one slice, not a whole fold.
STORE_SLICE = 8 << 20


def _rewrite(vol: Volume, base: Version, overlay: DirtyOverlay) -> Rewrite:
    """Re-chunk and store the new fragments (in slices): the fold's whole synchronous work."""
    def read_base(off: int, n: int) -> bytes:
        with vol.store.read() as txn:
            return vol.versions.read(txn, base, off, n)

    rw = rewrite(base, read_base, overlay, vol.params)
    items = rw.new_fragments
    i = 0
    while i < len(items):
        j, n = i, 0
        while j < len(items) and n < STORE_SLICE:
            n += len(items[j][1])
            j += 1
        vol.fragments.put_many(items[i:j])
        i = j
    return rw


def folds_inline(vol: Volume, overlay: DirtyOverlay) -> bool:
    """Whether folding `overlay` is cheap enough for the event loop (well under 10 ms)."""
    # Each separate extent costs a re-chunk of the fragments around it (up to two of
    # max_size), whatever its own size: scattered small writes are not a small fold.
    work = overlay.nbytes + overlay.extent_count * 2 * vol.params.max_size
    return work <= INLINE_BYTES


async def fold(vol: Volume, of: OpenFile, stats: Counter[str] | None = None) -> Version:
    """Turn the overlay into fragments; returns the unstored version they form.

    The caller holds `of.lock`. Big overlays are re-chunked in a worker thread so one
    large close does not stall every other request on the event loop. `stats` counts
    the bytes re-chunked: the cost of a commit, which must follow the edit, not the file.
    """
    overlay = of.overlay
    if not folds_inline(vol, overlay):
        rw = await trio.to_thread.run_sync(_rewrite, vol, of.base, overlay)
    else:
        rw = _rewrite(vol, of.base, overlay)
    if stats is not None:
        stats["folds"] += 1
        stats["rechunked_bytes"] += rw.rechunked_bytes
    folded = Version(-1, of.parent_version, sum(rw.lengths), None, 0, None, rw.hashes,
                     rw.lengths)
    of.base = folded
    of.overlay = DirtyOverlay(folded.size)
    return folded
