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

from annofs.content.fragments import fragment_hash
from annofs.content.holes import HOLE_MIN, HoleMap
from annofs.content.overlay import DirtyOverlay
from annofs.content.versions import fragment_starts
from annofs.store.keys import HASH_SIZE
from annofs.store.records import HOLE, Version, hole_indexes, lengths_array
from chunker import ChunkParams, cut_lengths

# How much new content to chunk per step, at most: large enough to amortise the call. The
# first step ends just past the old cut that follows the dirty range, and steps double
# from there: a one-byte edit usually resynchronises at that cut, and every base
# fragment read is a B-tree lookup and a page fault on a cold store (measured on a 1 GiB
# file: a 1 MiB first window read 1.6 MB of scattered LMDB pages in 385 faults, which
# readahead turned into 416 MB of disk reads and 340 ms).
_WINDOW = 1 << 20


@dataclass
class Rewrite:
    """The result: the new fragment list and the payloads of fragments to store."""

    hashes: bytes
    lengths: array
    new_fragments: list[tuple[bytes, bytes]]
    rechunked_bytes: int  # bytes that went through FastCDC (holes are cut without scanning)


ReadBase = Callable[[int, int], bytes]


def rewrite(base: Version, read_base: ReadBase, dirty: DirtyOverlay,
            params: ChunkParams, hole_min: int = HOLE_MIN) -> Rewrite:
    """Compute the fragment list of base+dirty. `read_base(off, n)` reads base content
    (never a hole of the base: those are known zeros).

    Pure CPU and reads: safe to run in a worker thread with its own read transaction.
    """
    size = dirty.size
    changed = dirty.changed_range(base.size)
    if changed is None:
        return Rewrite(base.hashes, base.lengths, [], 0)
    lo, hi = changed
    starts = fragment_starts(base)
    nfrag = base.count
    visible = dirty.base_visible(base.size)
    holes = HoleMap(base, dirty)
    hole_set = set(hole_indexes(base.hashes)) if base.may_have_holes else set()
    hole_spans = holes.base_holes
    hole_span_starts = [a for a, _ in hole_spans]

    # Start at the fragment holding `lo`; past the old end, at the old last fragment,
    # whose cut at EOF was forced rather than found. A hole at or just before the change
    # may shrink below hole_min (then its zeros join the data run before it): start at
    # the data fragment before such a hole, whose run end may move.
    first = 0 if nfrag == 0 else min(bisect_right(starts, lo) - 1, nfrag - 1)
    if first > 0 and starts[first] == lo and first - 1 in hole_set:
        first -= 1
    if first > 0 and first in hole_set:
        first -= 1
    pos = starts[first] if nfrag else 0

    def next_hole(p: int) -> tuple[int, int] | None:
        return holes.next_hole(p, hole_min)

    def new_content(off: int, n: int) -> bytearray:
        buf = bytearray(n)
        base_n = max(0, min(n, visible - off))
        if base_n:
            fill_base(buf, off, base_n)
        dirty.overlay(off, buf)
        return buf

    def fill_base(buf: bytearray, off: int, n: int) -> None:
        """Base bytes [off, off+n) into buf[0:n], leaving its holes as the zeros buf has."""
        pos = off
        end = off + n
        k = max(0, bisect_right(hole_span_starts, pos) - 1)
        for a, e in hole_spans[k:]:
            if a >= end:
                break
            if e <= pos:
                continue
            if a > pos:
                buf[pos - off : a - off] = read_base(pos, a - pos)
            pos = max(pos, e)
        if pos < end:
            buf[pos - off : end - off] = read_base(pos, end - pos)

    new_hashes = bytearray()
    new_lengths: list[int] = []
    # By hash: a sparse file's short zero runs are one chunk repeated; keep its bytes once.
    payloads: dict[bytes, bytes] = {}

    def resumes_at(cut: int) -> int | None:
        """The old fragment index to keep the tail from, if the new list has a cut at
        `cut` where the old one also has one, past the change."""
        if cut >= hi and cut < size and cut <= base.size:
            j = bisect_left(starts, cut)
            if j < nfrag and starts[j] == cut:
                return j
        return None

    resume: int | None = None  # index of the old fragment where the tail is kept
    # First step: to one byte past the old cut at or after the last dirty byte, the most
    # likely resynchronisation point (the byte past it lets the chunker confirm that cut).
    j = bisect_left(starts, hi)
    first_end = (starts[j] if j < len(starts) else size) + 1
    window = min(_WINDOW, max(params.min_size, first_end - pos))
    scanned = 0
    hole = next_hole(pos)
    while pos < size and resume is None:
        if hole is not None and hole[0] <= pos:
            new_hashes += HOLE
            new_lengths.append(hole[1] - pos)
            pos = hole[1]
            resume = resumes_at(pos)
            hole = next_hole(pos)
            continue
        run_end = hole[0] if hole is not None else size
        buf = new_content(pos, min(window, run_end - pos))
        final = pos + len(buf) >= run_end
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
            resume = resumes_at(pos + off)
            if resume is not None:
                break
        pos += off
        scanned += off
        window = min(_WINDOW, window * 2)
    tail = nfrag if resume is None else resume
    hashes = base.hashes[: first * HASH_SIZE] + bytes(new_hashes) + base.hashes[tail * HASH_SIZE :]
    # Packed arrays joined (a memcpy each), widened only when a hole or a long run needs it.
    wide = base.lengths.typecode == "Q" or HOLE in new_hashes or \
        any(n > 0xFFFFFFFF for n in new_lengths)
    tc = "Q" if wide else "I"

    def part(a: array) -> array:
        return a if a.typecode == tc else array(tc, a)

    lengths_out = lengths_array(hashes, part(base.lengths[:first]) + array(tc, new_lengths)
                                + part(base.lengths[tail:]))
    return Rewrite(hashes, lengths_out, list(payloads.items()), scanned)
