"""Readable differences: a unified diff for text, changed byte ranges with hex for binaries."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from annofs.printable import one_line

# Beyond this, a byte-level comparison of a binary is too slow for an interactive answer.
BINARY_DIFF_LIMIT = 4 << 20
TEXT_DIFF_LINES = 400
HEX_CONTEXT = 16


def is_text(data: bytes) -> bool:
    """UTF-8 without NUL bytes (what `git diff` would show as text)."""
    if b"\0" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def text_diff(a: bytes, b: bytes, a_name: str, b_name: str,
              max_lines: int = TEXT_DIFF_LINES) -> str:
    """A unified diff, cut at `max_lines` with a note saying so."""
    lines = list(difflib.unified_diff(
        a.decode().splitlines(keepends=True), b.decode().splitlines(keepends=True),
        fromfile=a_name, tofile=b_name))
    out = []
    for line in lines[:max_lines]:
        # Content is anybody's: a terminal escape or a bare CR in it is shown, not obeyed.
        body = line[:-1] if line.endswith("\n") else line
        body = one_line(body, keep="\t")
        out.append(body + "\n" if line.endswith("\n")
                   else body + "\n\\ No newline at end of file\n")
    if len(lines) > max_lines:
        out.append(f"... diff cut at {max_lines} of {len(lines)} lines\n")
    return "".join(out)


@dataclass(frozen=True)
class ByteRange:
    """One changed region: bytes [a_start, a_end) of the old became [b_start, b_end) of the new."""

    a_start: int
    a_end: int
    b_start: int
    b_end: int


# SequenceMatcher over bytes is roughly quadratic on binary data (measured: 27 s for two
# 150 KB random strings with 4 bytes flipped); it only sees what prefix, suffix and
# equal-length comparison could not settle, and only this much of it.
MATCHER_LIMIT = 32 << 10
_BLOCK = 64


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    k = 0
    step = 4096
    while k < n:
        s = min(step, n - k)
        if a[k:k + s] == b[k:k + s]:
            k += s
            continue
        if s <= _BLOCK:
            while k < n and a[k] == b[k]:
                k += 1
            return k
        step = max(_BLOCK, s // 8)
    return k


def _in_place(a: bytes, b: bytes, a0: int, b0: int) -> list[ByteRange]:
    """Ranges of differing bytes between equal-length strings (bytes replaced in place)."""
    out: list[ByteRange] = []
    start = -1
    for blk in range(0, len(a), _BLOCK):
        x, y = a[blk:blk + _BLOCK], b[blk:blk + _BLOCK]
        if x == y:
            if start >= 0:
                out.append(ByteRange(a0 + start, a0 + blk, b0 + start, b0 + blk))
                start = -1
            continue
        for k in range(len(x)):
            if x[k] != y[k]:
                if start < 0:
                    start = blk + k
            elif start >= 0:
                out.append(ByteRange(a0 + start, a0 + blk + k, b0 + start, b0 + blk + k))
                start = -1
    if start >= 0:
        out.append(ByteRange(a0 + start, a0 + len(a), b0 + start, b0 + len(b)))
    return out


def changed_ranges(a: bytes, b: bytes) -> list[ByteRange]:
    """The regions where two byte strings differ (insertions, deletions, replacements).

    Common prefix and suffix are cut first; an equal-length middle is compared byte for
    byte (a patched binary usually keeps its layout); otherwise a middle of up to
    MATCHER_LIMIT bytes is aligned by difflib, and a larger one is one replaced range.
    """
    pre = _common_prefix(a, b)
    suf = _common_prefix(a[pre:][::-1], b[pre:][::-1])
    ma, mb = a[pre:len(a) - suf], b[pre:len(b) - suf]
    if not ma and not mb:
        return []
    if len(ma) == len(mb):
        return _in_place(ma, mb, pre, pre)
    if max(len(ma), len(mb)) > MATCHER_LIMIT:
        return [ByteRange(pre, pre + len(ma), pre, pre + len(mb))]
    sm = difflib.SequenceMatcher(None, ma, mb, autojunk=False)
    return [ByteRange(pre + i1, pre + i2, pre + j1, pre + j2)
            for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal"]


def hex_view(data: bytes, start: int, end: int) -> str:
    """Hex of a region with HEX_CONTEXT bytes around it; changed bytes marked with '*'."""
    lo = max(0, start - HEX_CONTEXT)
    hi = min(len(data), max(end, start) + HEX_CONTEXT)
    rows = []
    for row in range(lo, hi, 16):
        chunk = data[row : min(row + 16, hi)]
        hexes = " ".join(
            f"{c:02x}" + ("*" if start <= row + k < end else " ") for k, c in enumerate(chunk))
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        rows.append(f"  {row:08x}  {hexes:<64} |{text}|")
    return "\n".join(rows)


def range_summary(ranges: list[ByteRange]) -> tuple[int, int, int]:
    """(bytes changed, inserted, deleted) over the ranges."""
    inserted = sum(max(0, (r.b_end - r.b_start) - (r.a_end - r.a_start)) for r in ranges)
    deleted = sum(max(0, (r.a_end - r.a_start) - (r.b_end - r.b_start)) for r in ranges)
    changed = sum(min(r.a_end - r.a_start, r.b_end - r.b_start) for r in ranges)
    return changed, inserted, deleted


def binary_diff(a: bytes, b: bytes, a_name: str, b_name: str, max_ranges: int = 20,
                ranges: list[ByteRange] | None = None) -> str:
    """Changed byte ranges, a summary, and a hex view of each range on both sides.

    `ranges`: already computed by `changed_ranges(a, b)` (it is the slow part).
    """
    if len(a) > BINARY_DIFF_LIMIT or len(b) > BINARY_DIFF_LIMIT:
        return (f"binary files {a_name} ({len(a)} bytes) and {b_name} ({len(b)} bytes) differ; "
                f"too large for a byte-level diff (limit {BINARY_DIFF_LIMIT} bytes)\n")
    if ranges is None:
        ranges = changed_ranges(a, b)
    changed, inserted, deleted = range_summary(ranges)
    out = [f"binary files {a_name} and {b_name} differ: {len(ranges)} changed range(s), "
           f"{changed} bytes changed, {inserted} inserted, {deleted} deleted\n"]
    for r in ranges[:max_ranges]:
        out.append(f"@@ {a_name} [{r.a_start:#x}, {r.a_end:#x}) -> "
                   f"{b_name} [{r.b_start:#x}, {r.b_end:#x}) @@\n")
        out.append(f"- {a_name}\n{hex_view(a, r.a_start, r.a_end)}\n")
        out.append(f"+ {b_name}\n{hex_view(b, r.b_start, r.b_end)}\n")
    if len(ranges) > max_ranges:
        out.append(f"... {len(ranges) - max_ranges} more range(s) not shown\n")
    return "".join(out)


def render_diff(a: bytes, b: bytes, a_name: str, b_name: str) -> str:
    """The right kind of diff for the content; empty when equal."""
    if a == b:
        return ""
    if is_text(a) and is_text(b):
        return text_diff(a, b, a_name, b_name)
    return binary_diff(a, b, a_name, b_name)
