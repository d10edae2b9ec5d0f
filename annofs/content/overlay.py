"""Bytes written to an open file and not yet turned into fragments."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator


class DirtyOverlay:
    """Sorted, non-overlapping written extents over a base version, plus a logical size.

    Sequential writes extend the last extent in place (amortised O(1) per write), so a
    large copy into the mount costs no quadratic merging.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = []
        self._data: list[bytearray] = []
        self.nbytes = 0
        self.truncated_to: int | None = None  # lowest size set since the base, if any
        # Punched ranges (fallocate PUNCH_HOLE, ZERO_RANGE): they read as unwritten zeros
        # over the base. Sorted, disjoint, and disjoint from the written extents (a write
        # takes its range out of them, a punch takes written bytes out).
        self.punched: list[tuple[int, int]] = []

    def __bool__(self) -> bool:
        return bool(self._starts) or self.truncated_to is not None or bool(self.punched)

    def punch(self, start: int, end: int) -> None:
        """Make [start, end) (within the size) read as zeros nobody wrote: a hole."""
        end = min(end, self.size)
        if start >= end:
            return
        self._drop_written(start, end)
        self.punched = _union([*self.punched, (start, end)])

    def _drop_written(self, start: int, end: int) -> None:
        """Take [start, end) out of the written extents (splitting those that cross it)."""
        i = max(0, bisect_right(self._starts, start) - 1)
        new_starts: list[int] = []
        new_data: list[bytearray] = []
        j = i
        while j < len(self._starts) and self._starts[j] < end:
            s, d = self._starts[j], self._data[j]
            e = s + len(d)
            if e <= start:
                new_starts.append(s)
                new_data.append(d)
            else:
                self.nbytes -= len(d)
                if s < start:
                    new_starts.append(s)
                    new_data.append(d[: start - s])
                    self.nbytes += start - s
                if e > end:
                    new_starts.append(end)
                    new_data.append(d[end - s :])
                    self.nbytes += e - end
            j += 1
        self._starts[i:j] = new_starts
        self._data[i:j] = new_data

    @property
    def extents(self) -> list[tuple[int, bytearray]]:
        """The written extents, in order."""
        return list(zip(self._starts, self._data, strict=True))

    def write(self, offset: int, data: bytes) -> None:
        """Record a write; later writes win over earlier ones where they overlap."""
        if not data:
            return
        end = offset + len(data)
        self.size = max(self.size, end)
        if self.punched:
            self.punched = _subtract(self.punched, offset, end)
        starts, datas = self._starts, self._data
        # Fast path: appending to (or overwriting the tail of) the last extent.
        if starts:
            last_start, last = starts[-1], datas[-1]
            last_end = last_start + len(last)
            if last_start <= offset <= last_end:
                rel = offset - last_start
                before = len(last)
                last[rel : rel + len(data)] = data
                self.nbytes += len(last) - before
                return
            if offset > last_end:
                starts.append(offset)
                datas.append(bytearray(data))
                self.nbytes += len(data)
                return
        # General case: merge every extent that touches [offset, end).
        i = bisect_right(starts, offset) - 1
        first = i if i >= 0 and starts[i] + len(datas[i]) >= offset else i + 1
        last_i = bisect_right(starts, end) - 1
        if first > last_i:
            starts.insert(first, offset)
            datas.insert(first, bytearray(data))
            self.nbytes += len(data)
            return
        new_start = min(offset, starts[first])
        tail_end = starts[last_i] + len(datas[last_i])
        merged = bytearray(max(end, tail_end) - new_start)
        for j in range(first, last_i + 1):
            s = starts[j] - new_start
            merged[s : s + len(datas[j])] = datas[j]
            self.nbytes -= len(datas[j])
        merged[offset - new_start : end - new_start] = data
        starts[first : last_i + 1] = [new_start]
        datas[first : last_i + 1] = [merged]
        self.nbytes += len(merged)

    def truncate(self, size: int) -> None:
        """Set the logical size; written bytes beyond it are dropped."""
        if size < self.size:
            self.truncated_to = size if self.truncated_to is None else min(self.truncated_to, size)
            i = bisect_left(self._starts, size)
            if i > 0 and self._starts[i - 1] + len(self._data[i - 1]) > size:
                keep = size - self._starts[i - 1]
                self.nbytes -= len(self._data[i - 1]) - keep
                del self._data[i - 1][keep:]
            for d in self._data[i:]:
                self.nbytes -= len(d)
            del self._starts[i:], self._data[i:]
        elif size > self.size and self.truncated_to is None:
            # Growing leaves a hole of zeros from the old end: mark the change there.
            self.truncated_to = self.size
        if self.punched and size < self.size:
            self.punched = _subtract(self.punched, size, self.size)
        self.size = size

    def base_visible(self, base_size: int) -> int:
        """How much of the base still shows: a shrink hides the rest, even after regrowth
        (the regrown part reads as zeros, or as what was written there)."""
        if self.truncated_to is None:
            return base_size
        return min(base_size, self.truncated_to)

    def touches(self, start: int, end: int) -> bool:
        """Whether any written extent overlaps [start, end)."""
        i = max(0, bisect_right(self._starts, start) - 1)
        while i < len(self._starts) and self._starts[i] < end:
            if self._starts[i] + len(self._data[i]) > start:
                return True
            i += 1
        return False

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of [start, end) no written extent covers, in order (lazily: a caller
        looking for the first long one stops there, not after every extent)."""
        pos = start
        i = max(0, bisect_right(self._starts, start) - 1)
        while i < len(self._starts) and self._starts[i] < end and pos < end:
            s, e = self._starts[i], self._starts[i] + len(self._data[i])
            if e > pos:
                if s > pos:
                    yield pos, s
                pos = e
            i += 1
        if pos < end:
            yield pos, end

    @property
    def extent_count(self) -> int:
        """How many separate written extents there are."""
        return len(self._starts)

    def changed_range(self, base_size: int) -> tuple[int, int] | None:
        """[lo, hi) of the logical content that may differ from the base, or None."""
        lo: int | None = None
        hi = 0
        if self._starts:
            lo = self._starts[0]
            hi = self._starts[-1] + len(self._data[-1])
        if self.punched:
            lo = self.punched[0][0] if lo is None else min(lo, self.punched[0][0])
            hi = max(hi, self.punched[-1][1])
        if self.size != base_size or self.truncated_to is not None:
            edge = min(self.size, base_size)
            if self.truncated_to is not None:
                edge = min(edge, self.truncated_to)
            lo = edge if lo is None else min(lo, edge)
            hi = self.size
        if lo is None or (lo >= self.size and self.size == base_size):
            return None
        return lo, max(hi, lo)

    def overlay(self, offset: int, buf: bytearray) -> None:
        """Paint the written extents (and the punched zeros) over `buf`, which holds
        content from `offset`."""
        end = offset + len(buf)
        for a, b in self.punched:
            lo, hi = max(a, offset), min(b, end)
            if lo < hi:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
        i = max(0, bisect_right(self._starts, offset) - 1)
        while i < len(self._starts) and self._starts[i] < end:
            s, d = self._starts[i], self._data[i]
            lo, hi = max(s, offset), min(s + len(d), end)
            if lo < hi:
                buf[lo - offset : hi - offset] = d[lo - s : hi - s]
            i += 1


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (overlapping or touching) intervals."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(spans: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """`spans` without [start, end)."""
    out = []
    for a, b in spans:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out
