"""Where a file's unwritten zeros are: its base version's holes, what a truncate cut off
and grew back, punched ranges, minus what was written since. Used to cut holes when an
edit is folded (rewrite) and to answer SEEK_DATA/SEEK_HOLE on a live file."""

from __future__ import annotations

import errno
import os
from bisect import bisect_right
from collections.abc import Iterator

from annofs.content.overlay import DirtyOverlay
from annofs.content.versions import fragment_starts
from annofs.errors import AnnofsError
from annofs.store.records import Version, hole_indexes

# Shorter runs of unwritten zeros are stored as data: a hole entry splits a data run in
# two (two forced cuts), which is worth it only for a run longer than a fragment.
HOLE_MIN = 64 << 10


class HoleMap:
    """The unwritten-zero runs of base + overlay, found in order from any position."""

    def __init__(self, base: Version, dirty: DirtyOverlay) -> None:
        self.size = dirty.size
        self.visible = dirty.base_visible(base.size)
        self.dirty = dirty
        starts = fragment_starts(base)
        # Base hole intervals [start, end), clipped to what still shows of the base.
        self.base_holes = [] if not base.may_have_holes else [
            (starts[i], min(starts[i + 1], self.visible)) for i in hole_indexes(base.hashes)
            if starts[i] < self.visible]
        self._base_starts = [a for a, _ in self.base_holes]

    def runs(self, p: int) -> Iterator[tuple[int, int]]:
        """Maximal runs of unwritten zeros that end after p, in order (a run that began
        before p is cut at p)."""
        k = max(0, bisect_right(self._base_starts, p) - 1)
        cands = [(max(a, p), e) for a, e in self.base_holes[k:] if e > p]
        cands += [(max(a, p), e) for a, e in self.dirty.punched if e > p]
        if self.visible < self.size:
            cands.append((max(self.visible, p), self.size))
        cands.sort()
        run: tuple[int, int] | None = None
        for a, e in cands:
            if a >= e:
                continue
            if run is not None and a <= run[1]:
                # Overlapping or touching candidates: one stretch to take writes out of.
                a = max(a, run[1])
                if a >= e:
                    continue
            for s, t in self.dirty.gaps(a, e):
                if run is not None and run[1] == s:
                    run = (run[0], t)
                    continue
                if run is not None:
                    yield run
                run = (s, t)
        if run is not None:
            yield run

    def next_hole(self, p: int, hole_min: int) -> tuple[int, int] | None:
        """The first run at or after p at least `hole_min` long, or None."""
        for run in self.runs(p):
            if run[1] - run[0] >= hole_min:
                return run
        return None


SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE


class NoDataError(AnnofsError):
    """SEEK_DATA at or past the last data (or past the end)."""

    errno = errno.ENXIO


def seek_data_hole(holes: HoleMap, offset: int, whence: int,
                   hole_min: int = HOLE_MIN) -> int:
    """lseek(2)'s SEEK_DATA / SEEK_HOLE: the first data (hole) position at or after
    `offset`; the end of the file counts as a hole. ENXIO at or past the end, and for
    SEEK_DATA when only holes follow. Holes are the runs a commit keeps as holes (at
    least `hole_min`): the answer does not change when the file is committed."""
    if offset < 0 or offset >= holes.size:
        raise NoDataError(f"offset {offset}: at or past the end ({holes.size} bytes)")
    # Whole runs (from 0: a run that began before `offset` counts by its full length).
    for a, b in holes.runs(0):
        if b <= offset or b - a < hole_min:
            continue
        if whence == SEEK_HOLE:
            return max(a, offset)
        if a > offset:
            return offset
        offset = b  # inside a hole: the data starts where it ends
    if whence == SEEK_HOLE:
        return holes.size
    if offset >= holes.size:
        raise NoDataError("only holes follow")
    return offset
