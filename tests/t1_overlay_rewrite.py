"""DirtyOverlay (written bytes over a base) and rewrite() (re-chunking only around a change).

The overlay is checked against a plain bytearray model of the file under random writes and
truncates. rewrite() promises that its fragment list is exactly what a whole-content pass
of `chunker.cut_lengths` gives on the new bytes (so dedup does not drift with edits), while
re-chunking only around the change; both halves of that promise are checked here.
"""

from __future__ import annotations

import itertools
import random
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import pytest

from annofs.content.overlay import DirtyOverlay
from annofs.content.rewrite import rewrite
from annofs.store.keys import HASH_SIZE
from annofs.store.records import HOLE, Version, lengths_array
from chunker import DEFAULT_PARAMS, ChunkParams, cut_lengths

SMALL = ChunkParams(64, 256, 1024)  # many fragments in little data: fast and thorough
MiB = 1 << 20

# -- the model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes

    def __repr__(self) -> str:
        return f"Write({self.offset}, <{len(self.data)} bytes>)"


@dataclass(frozen=True)
class Truncate:
    size: int


@dataclass(frozen=True)
class Punch:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): zeros nobody wrote, within the size."""

    start: int
    end: int


Op = Write | Truncate | Punch


def apply_model(model: bytearray, op: Op) -> None:
    """What POSIX pwrite/ftruncate do to a file's bytes."""
    if isinstance(op, Write):
        if op.offset > len(model):
            model.extend(bytes(op.offset - len(model)))
        model[op.offset : op.offset + len(op.data)] = op.data
    elif op.size < len(model):
        del model[op.size :]
    else:
        model.extend(bytes(op.size - len(model)))


def apply_overlay(ov: DirtyOverlay, op: Op) -> None:
    if isinstance(op, Write):
        ov.write(op.offset, op.data)
    elif isinstance(op, Punch):
        ov.punch(op.start, op.end)
    else:
        ov.truncate(op.size)


def overlay_content(ov: DirtyOverlay, base: bytes) -> bytes:
    """The file as the overlay describes it: base bytes up to the lowest truncation, zeros
    beyond, the written extents painted over."""
    keep = len(base) if ov.truncated_to is None else min(len(base), ov.truncated_to)
    buf = bytearray(ov.size)
    n = min(keep, ov.size)
    buf[:n] = base[:n]
    ov.overlay(0, buf)
    return bytes(buf)


def random_op(rng: random.Random, size: int, max_len: int = 300) -> Op:
    r = rng.random()
    if r < 0.6:
        offset = rng.randrange(0, size + 1) if size else 0
        if rng.random() < 0.15:
            offset = size + rng.randrange(0, 2000)  # past EOF: a hole
        return Write(offset, rng.randbytes(rng.randrange(1, max_len)))
    if r < 0.8:
        return Truncate(rng.randrange(0, size + 1))
    return Truncate(size + rng.randrange(0, 3000))


def check_overlay_invariants(ov: DirtyOverlay, base: bytes, model: bytes) -> None:
    extents = ov.extents
    assert ov.size == len(model)
    assert ov.nbytes == sum(len(d) for _, d in extents)
    prev_end = -1
    for start, data in extents:
        assert data, "empty extent"
        assert start >= max(prev_end, 0), "extents overlap or are unsorted"
        prev_end = start + len(data)
    assert prev_end <= ov.size, "an extent beyond the logical size"
    changed = ov.changed_range(len(base))
    if changed is None:
        assert model == base
        return
    lo, hi = changed
    assert 0 <= lo <= hi <= ov.size
    assert model[:lo] == base[:lo], "a change below the changed range"
    if len(model) == len(base):
        assert model[hi:] == base[hi:], "a change above the changed range"


# -- DirtyOverlay --------------------------------------------------------------------------


def test_overlay_matches_bytearray_model_under_random_ops() -> None:
    deadline = time.monotonic() + 3.0
    runs = 0
    for seed in range(2000):
        if time.monotonic() > deadline and runs >= 200:
            break
        rng = random.Random(seed)
        base = rng.randbytes(rng.choice([0, 1, 100, 3000]))
        model = bytearray(base)
        ov = DirtyOverlay(len(base))
        ops: list[Op] = []
        for _ in range(rng.randrange(1, 25)):
            op = random_op(rng, len(model))
            ops.append(op)
            apply_model(model, op)
            apply_overlay(ov, op)
            got = overlay_content(ov, base)
            assert got == model, f"seed {seed}: content differs after {ops}"
            check_overlay_invariants(ov, base, bytes(model))
        runs += 1
    assert runs >= 200


def test_sequential_writes_extend_one_extent() -> None:
    ov = DirtyOverlay(0)
    for i in range(1000):
        ov.write(i * 100, bytes([i % 256]) * 100)
    assert len(ov.extents) == 1
    assert ov.nbytes == ov.size == 100_000


def test_overlapping_write_merges_every_extent_it_touches() -> None:
    ov = DirtyOverlay(1000)
    ov.write(100, b"a" * 10)
    ov.write(200, b"b" * 10)
    ov.write(300, b"c" * 10)
    ov.write(105, b"X" * 200)  # the end of the 1st, all the 2nd, into the 3rd
    assert [(s, len(d)) for s, d in ov.extents] == [(100, 210)]
    assert ov.nbytes == 210
    buf = bytearray(1000)
    ov.overlay(0, buf)
    assert buf[100:105] == b"a" * 5 and buf[105:305] == b"X" * 200 and buf[305:310] == b"c" * 5


def test_empty_write_changes_nothing() -> None:
    ov = DirtyOverlay(10)
    ov.write(50, b"")
    assert not ov
    assert ov.size == 10
    assert ov.changed_range(10) is None


def test_truncate_drops_written_bytes_beyond() -> None:
    ov = DirtyOverlay(0)
    ov.write(0, b"abcdef")
    ov.write(100, b"ghij")
    ov.truncate(3)
    assert [(s, bytes(d)) for s, d in ov.extents] == [(0, b"abc")]
    assert ov.nbytes == 3 and ov.truncated_to == 3


def test_growing_marks_the_old_end_as_changed() -> None:
    ov = DirtyOverlay(100)
    ov.truncate(150)
    assert ov
    assert ov.changed_range(100) == (100, 150)


def test_overlay_paints_a_window() -> None:
    ov = DirtyOverlay(100)
    ov.write(10, b"0123456789")
    buf = bytearray(b"." * 8)
    ov.overlay(6, buf)
    assert buf == b"....0123"
    buf = bytearray(b"." * 4)
    ov.overlay(18, buf)
    assert buf == b"89.."


# -- rewrite -------------------------------------------------------------------------------


def fragments_of(data: bytes, params: ChunkParams) -> tuple[list[int], bytes]:
    """What a whole-content pass (a fresh import) cuts: lengths and concatenated hashes."""
    lengths = cut_lengths(data, params)
    hashes = bytearray()
    off = 0
    for n in lengths:
        hashes += blake3.blake3(data[off : off + n]).digest()
        off += n
    return lengths, bytes(hashes)


# Fresh ids: annofs caches fragment offsets per stored version (id, time, size, count), so
# two synthetic versions must not share all four.
_IDS = itertools.count(1 << 40)


def make_version(data: bytes, params: ChunkParams) -> Version:
    lengths, hashes = fragments_of(data, params)
    return Version(next(_IDS), 0, len(data), None, time.time_ns(), None, hashes,
                   array("I", lengths))


def base_reader(base: bytes, log: list[tuple[int, int]] | None = None
                ) -> Callable[[int, int], bytes]:
    def read(off: int, n: int) -> bytes:
        assert off >= 0 and n > 0 and off + n <= len(base), f"read_base({off}, {n}) out of range"
        if log is not None:
            log.append((off, n))
        return base[off : off + n]
    return read


def hash_list(hashes: bytes) -> list[bytes]:
    return [hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)]


def check_rewrite(base: bytes, ops: list[Op], params: ChunkParams = SMALL) -> None:
    v = make_version(base, params)
    ov = DirtyOverlay(len(base))
    model = bytearray(base)
    for op in ops:
        apply_overlay(ov, op)
        apply_model(model, op)
    r = rewrite(v, base_reader(base), ov, params)
    want_lengths, want_hashes = fragments_of(bytes(model), params)
    assert list(r.lengths) == want_lengths, f"cuts differ from a whole pass after {ops}"
    assert hash_list(r.hashes) == hash_list(want_hashes), f"content differs after {ops}"
    # Every payload is what its hash names, and every fragment the base lacks is among them.
    payloads = dict(r.new_fragments)
    for h, data in r.new_fragments:
        assert blake3.blake3(data).digest() == h
    missing = set(hash_list(r.hashes)) - set(hash_list(v.hashes)) - payloads.keys()
    assert not missing, f"{len(missing)} new fragments not returned for storing after {ops}"
    assert 0 <= r.rechunked_bytes <= len(model)


CASES: list[tuple[str, int, Callable[[random.Random, bytes], list[Op]]]] = [
    ("overwrite-middle", 20000, lambda rng, b: [Write(len(b) // 2, rng.randbytes(50))]),
    ("one-byte-middle", 20000, lambda rng, b: [Write(len(b) // 2, b"\x00")]),
    ("append", 20000, lambda rng, b: [Write(len(b), rng.randbytes(3000))]),
    ("append-small", 20000, lambda rng, b: [Write(len(b), b"x")]),
    ("truncate-shorter", 20000, lambda rng, b: [Truncate(len(b) // 3)]),
    ("truncate-to-zero", 20000, lambda rng, b: [Truncate(0)]),
    ("truncate-last-byte", 20000, lambda rng, b: [Truncate(len(b) - 1)]),
    ("extend-with-hole", 20000, lambda rng, b: [Truncate(len(b) + 5000)]),
    ("write-past-eof", 20000, lambda rng, b: [Write(len(b) + 3000, rng.randbytes(700))]),
    ("edit-at-zero", 20000, lambda rng, b: [Write(0, b"Y")]),
    ("insert-like-at-zero", 20000, lambda rng, b: [Write(0, rng.randbytes(2000))]),
    ("edit-at-last-byte", 20000, lambda rng, b: [Write(len(b) - 1, b"Z")]),
    ("edit-across-end", 20000, lambda rng, b: [Write(len(b) - 10, rng.randbytes(100))]),
    ("same-bytes-again", 20000, lambda rng, b: [Write(100, b[100:5000])]),
    ("empty-base-write", 0, lambda rng, b: [Write(0, rng.randbytes(5000))]),
    ("empty-base-hole", 0, lambda rng, b: [Truncate(3000)]),
    ("empty-base-write-past-eof", 0, lambda rng, b: [Write(2000, rng.randbytes(10))]),
    ("scattered", 20000, lambda rng, b: [Write(rng.randrange(len(b)), rng.randbytes(20))
                                          for _ in range(8)]),
    ("truncate-then-write-back", 20000,
     lambda rng, b: [Truncate(len(b) // 2), Write(len(b) // 2, rng.randbytes(len(b) // 2))]),
    # A hole over old bytes: POSIX reads zeros where the file was cut, not the old data.
    ("truncate-then-extend", 20000, lambda rng, b: [Truncate(len(b) // 2), Truncate(len(b))]),
    ("truncate-then-write-past", 20000,
     lambda rng, b: [Truncate(100), Write(len(b) + 10, b"tail")]),
    ("truncate-then-extend-larger", 20000, lambda rng, b: [Truncate(5000), Truncate(len(b) + 100)]),
]


@pytest.mark.parametrize(("name", "size", "ops"), CASES, ids=[c[0] for c in CASES])
def test_rewrite_equals_whole_pass(name: str, size: int,
                                   ops: Callable[[random.Random, bytes], list[Op]]) -> None:
    rng = random.Random(name)
    base = rng.randbytes(size)
    check_rewrite(base, ops(rng, base))


def test_rewrite_with_default_params() -> None:
    rng = random.Random(5)
    base = rng.randbytes(600_000)
    for ops in ([Write(300_000, b"hello")], [Write(600_000, rng.randbytes(70_000))],
                [Truncate(250_000)], [Write(0, b"A"), Write(599_999, b"B")]):
        check_rewrite(base, ops, DEFAULT_PARAMS)


def test_rewrite_random_edits_equal_whole_pass() -> None:
    deadline = time.monotonic() + 4.0
    runs = 0
    failures: list[str] = []
    for seed in range(5000):
        if time.monotonic() > deadline and runs >= 150:
            break
        rng = random.Random(seed)
        base = rng.randbytes(rng.choice([0, 50, 1000, 8000, 30000]))
        ops: list[Op] = []
        size = len(base)
        for _ in range(rng.randrange(1, 6)):
            op = random_op(rng, size, max_len=2000)
            ops.append(op)
            size = op.size if isinstance(op, Truncate) else max(size, op.offset + len(op.data))
        try:
            check_rewrite(base, ops)
        except AssertionError as e:
            failures.append(f"seed {seed}, base {len(base)} bytes: {str(e).splitlines()[0]}")
        runs += 1
    assert runs >= 150
    if failures:
        pytest.fail(f"{len(failures)} of {runs} random edit sequences differ from a whole "
                    "pass; first ones:\n" + "\n".join(failures[:5]))


def test_unchanged_overlay_keeps_the_base() -> None:
    base = random.Random(1).randbytes(10000)
    v = make_version(base, SMALL)
    r = rewrite(v, base_reader(base), DirtyOverlay(len(base)), SMALL)
    assert r.hashes == v.hashes and list(r.lengths) == list(v.lengths)
    assert r.new_fragments == [] and r.rechunked_bytes == 0


def test_one_byte_edit_in_64_mib_rechunks_a_few_fragments() -> None:
    size = 64 * MiB
    base = random.Random(64).randbytes(size)
    v = make_version(base, DEFAULT_PARAMS)
    ov = DirtyOverlay(size)
    where = size // 2 + 12345
    ov.write(where, bytes([base[where] ^ 0xFF]))
    reads: list[tuple[int, int]] = []
    r = rewrite(v, base_reader(base, reads), ov, DEFAULT_PARAMS)

    assert r.rechunked_bytes < MiB
    assert sum(n for _, n in reads) <= 2 * MiB, "read far more of the base than the edit needs"
    old, new = hash_list(v.hashes), hash_list(r.hashes)
    # The fragments before and after the change are the base's own, in place.
    prefix = next(i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b)
    suffix = next(i for i, (a, b) in enumerate(zip(old[::-1], new[::-1], strict=False))
                  if a != b)
    assert len(old) - prefix - suffix <= 4 and len(new) - prefix - suffix <= 4
    assert len(r.new_fragments) <= 4
    assert sum(r.lengths) == size

    model = bytearray(base)
    model[where] ^= 0xFF
    want_lengths, want_hashes = fragments_of(bytes(model), DEFAULT_PARAMS)
    assert list(r.lengths) == want_lengths and r.hashes == want_hashes


# -- holes ---------------------------------------------------------------------------------
# The model keeps, per byte, whether it is an unwritten zero (a hole byte): grown by a
# truncate or skipped by a write past the end. The canonical list (what rewrite must give)
# makes each maximal run of hole bytes of at least `hole_min` a hole entry and chunks the
# data between holes as separate files.

HOLE_MIN_SMALL = 1500


def apply_hole_model(model: bytearray, holes: bytearray, op: Op) -> None:
    """POSIX on the bytes, and which bytes nobody wrote (holes[i] == 1)."""
    if isinstance(op, Punch):
        end = min(op.end, len(model))
        if op.start < end:
            model[op.start : end] = bytes(end - op.start)
            holes[op.start : end] = b"\x01" * (end - op.start)
        return
    if isinstance(op, Write):
        if op.offset > len(model):
            holes.extend(b"\x01" * (op.offset - len(model)))
        apply_model(model, op)
        end = op.offset + len(op.data)
        holes[op.offset : end] = bytes(len(op.data))
        del holes[len(model):]
    elif op.size < len(model):
        apply_model(model, op)
        del holes[op.size :]
    else:
        holes.extend(b"\x01" * (op.size - len(model)))
        apply_model(model, op)


def canonical(data: bytes, holes: bytes, params: ChunkParams,
              hole_min: int) -> tuple[list[int], bytes]:
    """The fragment list of `data` with hole runs of at least hole_min as hole entries."""
    lengths: list[int] = []
    hashes = bytearray()
    pos = 0
    run_start = 0

    def data_run(a: int, b: int) -> None:
        got_lengths, got_hashes = fragments_of(data[a:b], params) if b > a else ([], b"")
        lengths.extend(got_lengths)
        hashes.extend(got_hashes)

    while pos < len(data):
        if holes[pos]:
            end = pos
            while end < len(data) and holes[end]:
                end += 1
            if end - pos >= hole_min:
                data_run(run_start, pos)
                lengths.append(end - pos)
                hashes.extend(HOLE)
                run_start = end
            pos = end
        else:
            pos += 1
    data_run(run_start, len(data))
    return lengths, bytes(hashes)


def make_holey_version(data: bytes, holes: bytes, params: ChunkParams,
                       hole_min: int) -> Version:
    lengths, hashes = canonical(data, holes, params, hole_min)
    return Version(next(_IDS), 0, len(data), None, time.time_ns(), None, hashes,
                   lengths_array(hashes, array("Q", lengths)))


def holey_reader(data: bytes, v: Version) -> Callable[[int, int], bytes]:
    """Base reads, which must never ask for a hole of the base (it is known zeros)."""
    starts = [0]
    for n in v.lengths:
        starts.append(starts[-1] + n)
    spans = [(starts[i], starts[i + 1]) for i in range(v.count) if v.is_hole(i)]

    def read(off: int, n: int) -> bytes:
        assert off >= 0 and n > 0 and off + n <= len(data)
        assert not any(a < off + n and off < b for a, b in spans), \
            f"read_base({off}, {n}) reads a hole of the base"
        return data[off : off + n]
    return read


def check_holey_rewrite(seed: int) -> None:
    rng = random.Random(seed)
    model, holes = bytearray(), bytearray()
    for op in [Write(0, rng.randbytes(rng.randrange(0, 6000)))] + [
            Truncate(rng.randrange(0, 20000)) if rng.random() < 0.3 else
            Write(rng.randrange(0, 20000), rng.randbytes(rng.randrange(1, 2500)))
            for _ in range(rng.randrange(0, 5))]:
        apply_hole_model(model, holes, op)
    base, base_holes = bytes(model), bytes(holes)
    v = make_holey_version(base, base_holes, SMALL, HOLE_MIN_SMALL)
    # Stored, a short run of unwritten zeros became data: only hole entries stay holes.
    holes = bytearray(len(base))
    pos = 0
    for i in range(v.count):
        if v.is_hole(i):
            holes[pos : pos + v.lengths[i]] = b"\x01" * v.lengths[i]
        pos += v.lengths[i]
    ov = DirtyOverlay(len(base))
    ops: list[Op] = []
    for _ in range(rng.randrange(1, 6)):
        size = len(model)
        r = rng.random()
        if r < 0.4:
            op: Op = Write(rng.randrange(0, size + 6000),
                           rng.randbytes(rng.randrange(1, 3000)))
        elif r < 0.55:
            a = rng.randrange(0, size + 100)
            op = Punch(a, a + rng.randrange(1, 6000))
        elif r < 0.75:
            op = Truncate(rng.randrange(0, size + 1))
        else:
            op = Truncate(size + rng.randrange(0, 9000))
        ops.append(op)
        apply_overlay(ov, op)
        apply_hole_model(model, holes, op)
    r = rewrite(v, holey_reader(base, v), ov, SMALL, hole_min=HOLE_MIN_SMALL)
    want_lengths, want_hashes = canonical(bytes(model), bytes(holes), SMALL, HOLE_MIN_SMALL)
    where = f"seed {seed}: base {v.count} entries, ops {ops}"
    assert list(r.lengths) == want_lengths, f"cuts differ from the canonical list; {where}"
    assert r.hashes == want_hashes, f"content differs; {where}"
    assert (r.lengths.typecode == "Q") == (HOLE in hash_list(r.hashes)), where
    payloads = dict(r.new_fragments)
    assert HOLE not in payloads, "a hole was given bytes to store"
    missing = set(hash_list(r.hashes)) - set(hash_list(v.hashes)) - payloads.keys() - {HOLE}
    assert not missing, where


def test_rewrite_with_holes_equals_the_canonical_list() -> None:
    """Edits next to, inside and across holes, truncates into and out of them, holes that
    shrink below hole_min (their zeros join the data run) or merge with a new one."""
    deadline = time.monotonic() + 5.0
    for seed in range(20000):
        if time.monotonic() > deadline and seed >= 300:
            break
        check_holey_rewrite(seed)


def test_a_huge_hole_costs_nothing_to_make_or_edit() -> None:
    """Growing by a pebibyte, then writing a byte at a tebibyte: O(1) in the hole's length."""
    base = random.Random(3).randbytes(100_000)
    v = make_version(base, DEFAULT_PARAMS)
    ov = DirtyOverlay(len(base))
    ov.truncate(1 << 50)
    t = time.perf_counter()
    r = rewrite(v, base_reader(base), ov, DEFAULT_PARAMS)
    assert r.hashes[-HASH_SIZE:] == HOLE and r.lengths[-1] == (1 << 50) - len(base)
    assert r.rechunked_bytes <= 2 * DEFAULT_PARAMS.max_size
    grown = Version(next(_IDS), 0, 1 << 50, None, time.time_ns(), None, r.hashes, r.lengths)
    ov = DirtyOverlay(grown.size)
    ov.write(1 << 40, b"x")
    r2 = rewrite(grown, holey_reader(base, grown), ov, DEFAULT_PARAMS)
    assert time.perf_counter() - t < 1.0
    assert list(r2.lengths[-3:]) == [(1 << 40) - len(base), 1, (1 << 50) - (1 << 40) - 1]
    assert hash_list(r2.hashes)[-3:] == [HOLE, blake3.blake3(b"x").digest(), HOLE]
    # The byte, and the data fragment before the hole (whose run end a shrunk hole moves).
    assert r2.rechunked_bytes <= DEFAULT_PARAMS.max_size + 1
