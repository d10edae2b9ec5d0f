"""Turn a base version plus written bytes into a new fragment list, re-chunking only
around the change.

FastCDC (ronomon) resets its state at every cut, so chunking from any cut of the old
content reproduces the cuts a whole-file pass would make. Re-chunk from the start of the
first changed fragment, and stop as soon as a new cut lands on an old cut past the last
changed byte: every fragment after it is kept. The fragment list stays exactly what a
fresh import of the same bytes would give, so dedup does not drift with edits.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from annofs.content.fragments import fragment_hash
from annofs.content.overlay import DirtyOverlay
from annofs.content.versions import fragment_starts
from annofs.store.keys import HASH_SIZE
from annofs.store.records import Version
from chunker import ChunkParams, cut_lengths

# How much new content to chunk per step, at most: large enough to amortise the call. The
# first step ends just past the old cut that follows the dirty range, and steps double
# from there: a one-byte edit usually resynchronises at that cut, and every base
# fragment read is a B-tree lookup and a page fault on a cold store (measured on a 1 GiB
# file: a 1 MiB first window read 1.6 MB of scattered LMDB pages in 385 faults, which
# readahead turned into 416 MB of disk reads and 340 ms).
_WINDOW = 1 << 20


@lru_cache(maxsize=8)
def _zero_cut(params: ChunkParams) -> tuple[int, bytes] | None:
    """(length, hash) of the chunk FastCDC cuts from a run of zeros, if it is max_size.

    Then a hole can be cut without scanning: every max_size bytes of zeros that start at
    a cut end at the next one. Measured, not assumed, for each parameter set.
    """
    first = cut_lengths(bytes(2 * params.max_size), params)[0]
    if first != params.max_size:
        return None
    return first, fragment_hash(bytes(first))


@dataclass
class Rewrite:
    """The result: the new fragment list and the payloads of fragments to store."""

    hashes: bytes
    lengths: array
    new_fragments: list[tuple[bytes, bytes]]
    rechunked_bytes: int  # bytes that went through FastCDC (holes are cut without scanning)


ReadBase = Callable[[int, int], bytes]


def rewrite(base: Version, read_base: ReadBase, dirty: DirtyOverlay,
            params: ChunkParams) -> Rewrite:
    """Compute the fragment list of base+dirty. `read_base(off, n)` reads base content.

    Pure CPU and reads: safe to run in a worker thread with its own read transaction.
    """
    size = dirty.size
    changed = dirty.changed_range(base.size)
    if changed is None:
        return Rewrite(base.hashes, base.lengths, [], 0)
    lo, hi = changed
    starts = fragment_starts(base)
    nfrag = base.count
    # Start at the fragment holding `lo`; past the old end, at the old last fragment,
    # whose cut at EOF was forced rather than found.
    first = 0 if nfrag == 0 else min(bisect_right(starts, lo) - 1, nfrag - 1)
    pos = starts[first] if nfrag else 0

    visible = dirty.base_visible(base.size)

    def new_content(off: int, n: int) -> bytearray:
        n = min(n, size - off)
        buf = bytearray(n)
        base_n = max(0, min(n, visible - off))
        if base_n:
            buf[:base_n] = read_base(off, base_n)
        dirty.overlay(off, buf)
        return buf

    new_hashes = bytearray()
    new_lengths = array("I")
    # By hash: a sparse file's holes are one chunk repeated; keep its bytes once.
    payloads: dict[bytes, bytes] = {}
    zero = _zero_cut(params)

    def in_hole(start: int, end: int) -> bool:
        return start >= visible and end <= size and not dirty.touches(start, end)

    resume: int | None = None  # index of the old fragment where the tail is kept
    # First step: to one byte past the old cut at or after the last dirty byte, the most
    # likely resynchronisation point (the byte past it lets the chunker confirm that cut).
    j = bisect_left(starts, hi)
    first_end = (starts[j] if j < len(starts) else size) + 1
    window = min(_WINDOW, max(params.min_size, first_end - pos))
    scanned = 0
    while pos < size and resume is None:
        if zero is not None and in_hole(pos, pos + zero[0]):
            new_hashes += zero[1]
            new_lengths.append(zero[0])
            payloads.setdefault(zero[1], bytes(zero[0]))
            pos += zero[0]
            continue  # no old cut lies in a hole (holes are past the old content)
        buf = new_content(pos, window)
        final = pos + len(buf) >= size
        lengths = cut_lengths(buf, params, final=final)
        if not lengths:
            window *= 2  # no cut in the window: only possible for a window < max_size
            continue
        view = memoryview(buf)
        off = 0
        for n in lengths:
            chunk = bytes(view[off : off + n])
            h = fragment_hash(chunk)
            new_hashes += h
            new_lengths.append(n)
            payloads.setdefault(h, chunk)
            off += n
            cut = pos + off
            if cut >= hi and cut < size and cut <= base.size:
                j = bisect_left(starts, cut)
                if j < nfrag and starts[j] == cut:
                    resume = j
                    break
        pos += off
        scanned += off
        window = min(_WINDOW, window * 2)
    if resume is None:
        tail_hashes, tail_lengths = b"", array("I")
    else:
        tail_hashes = base.hashes[resume * HASH_SIZE :]
        tail_lengths = base.lengths[resume:]
    hashes = base.hashes[: first * HASH_SIZE] + bytes(new_hashes) + tail_hashes
    lengths_out = base.lengths[:first] + new_lengths + tail_lengths
    return Rewrite(hashes, lengths_out, list(payloads.items()), scanned)
