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
from annofs.content.overlay import DirtyOverlay
from annofs.content.versions import fragment_starts
from annofs.store.keys import HASH_SIZE
from annofs.store.records import Version
from chunker import ChunkParams, cut_lengths

# How much new content to chunk per step: large enough to amortise the call, small enough
# that a one-byte edit reads little past the resynchronisation point.
_WINDOW = 1 << 20


@dataclass
class Rewrite:
    """The result: the new fragment list and the payloads of fragments to store."""

    hashes: bytes
    lengths: array
    new_fragments: list[tuple[bytes, bytes]]
    rechunked_bytes: int


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
    payloads: list[tuple[bytes, bytes]] = []
    resume: int | None = None  # index of the old fragment where the tail is kept
    window = _WINDOW
    start_pos = pos
    while pos < size and resume is None:
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
            payloads.append((h, chunk))
            off += n
            cut = pos + off
            if cut >= hi and cut < size and cut <= base.size:
                j = bisect_left(starts, cut)
                if j < nfrag and starts[j] == cut:
                    resume = j
                    break
        pos += off
    if resume is None:
        tail_hashes, tail_lengths = b"", array("I")
    else:
        tail_hashes = base.hashes[resume * HASH_SIZE :]
        tail_lengths = base.lengths[resume:]
    hashes = base.hashes[: first * HASH_SIZE] + bytes(new_hashes) + tail_hashes
    lengths_out = base.lengths[:first] + new_lengths + tail_lengths
    return Rewrite(hashes, lengths_out, payloads, pos - start_pos)
