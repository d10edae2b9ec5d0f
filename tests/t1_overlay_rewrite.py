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
from annofs.store.records import Version
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


Op = Write | Truncate


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
