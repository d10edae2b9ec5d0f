"""annofs.content._hashcheck (csrc/hashcheck.c): BLAKE3 checks of a batch of fragments in
one C call, and the plain-C check pyfuse3's checked replies call (VERIFY_IOV), against the
`blake3` package as the oracle."""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time
from collections.abc import Callable

import blake3
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from annofs.content._hashcheck import VERIFY_IOV, first_mismatch

# Around BLAKE3's block (64) and chunk (1024) edges, the GIL threshold (2048), SIMD
# batch widths, and a fragment of the largest size.
SIZES = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 4096, 8191, 16384 + 7,
         65536, 1 << 20]


def h(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def test_every_size_and_buffer_kind_hashes_as_the_blake3_package() -> None:
    rng = random.Random(7)
    base = rng.randbytes(sum(SIZES) + 100)
    datas: list[bytes | bytearray | memoryview] = []
    pos = 3  # memoryview slices start off any alignment
    for i, n in enumerate(SIZES):
        piece = base[pos:pos + n]
        datas.append([piece, bytearray(piece), memoryview(base)[pos:pos + n]][i % 3])
        pos += n
    hashes = [h(d) for d in datas]
    assert first_mismatch(datas, hashes) == -1
    for k in range(len(datas)):
        wrong = list(hashes)
        wrong[k] = h(b"not " + bytes(datas[k]))
        assert first_mismatch(datas, wrong) == k


def test_zstd_segments_as_check_decompressed_gets_them() -> None:
    frames = [zstandard.ZstdCompressor().compress(os.urandom(n) * 3) for n in (100, 5000, 20000)]
    out = zstandard.ZstdDecompressor().multi_decompress_to_buffer(frames)
    segments = [out[i] for i in range(len(out))]
    hashes = [h(bytes(s)) for s in segments]
    assert first_mismatch(segments, hashes) == -1
    assert first_mismatch(segments, [hashes[0], hashes[0], hashes[2]]) == 1


@pytest.mark.parametrize("bad", [[5], [40], [63], [40, 5], [0, 63]])
def test_a_request_sized_batch_names_its_first_bad_fragment(bad: list[int]) -> None:
    frags = [os.urandom(16384) for _ in range(64)]  # 1 MiB, as a mount read's
    hashes = [h(f) for f in frags]
    for k in bad:
        frags[k] = frags[k][:-1] + bytes([frags[k][-1] ^ 1])
    assert first_mismatch(frags, hashes) == min(bad)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 70000), max_size=40), data=st.data())
def test_one_flipped_bit_anywhere_is_found(sizes: list[int], data: st.DataObject) -> None:
    frags = [bytearray(os.urandom(n)) for n in sizes]
    hashes = [h(f) for f in frags]
    assert first_mismatch(frags, hashes) == -1
    nonempty = [i for i, f in enumerate(frags) if f]
    if nonempty:
        k = data.draw(st.sampled_from(nonempty))
        bit = data.draw(st.integers(0, 8 * len(frags[k]) - 1))
        frags[k][bit // 8] ^= 1 << (bit % 8)
        assert first_mismatch(frags, hashes) == k


def test_nothing_to_check_is_no_mismatch() -> None:
    assert first_mismatch([], []) == -1
    assert first_mismatch((b"",), (h(b""),)) == -1


def test_bad_arguments_are_errors_that_say_what_and_release_every_buffer() -> None:
    held = bytearray(b"abc")
    with pytest.raises(ValueError, match="2 datas but 1 hashes"):
        first_mismatch([held, b"x"], [h(held)])
    with pytest.raises(ValueError, match=r"hashes\[1\] is not 32 bytes"):
        first_mismatch([held, b"x"], [h(held), h(b"x")[:31]])
    with pytest.raises(ValueError, match=r"hashes\[0\] is not 32 bytes"):
        first_mismatch([held], [h(held).hex()])
    with pytest.raises(TypeError):
        first_mismatch([held, "not a buffer"], [h(held), h(b"")])
    with pytest.raises(TypeError, match="datas must be a sequence"):
        first_mismatch(5, [])
    # Every buffer taken was given back, on the error paths too: a bytearray with an
    # export left behind could not change its size.
    held.extend(b"def")
    assert first_mismatch([held], [h(b"abcdef")]) == -1
    held.extend(b"g")


def other_thread_ran_inside(call: Callable[[], object]) -> bool:
    """Whether another Python thread ran in the middle of `call` (from 30% to 70% of its
    time). A C call holding the GIL admits no bytecode of any other thread until it
    returns; the other thread may only run just before the call begins (up to one switch
    interval, 5 ms) and after it ends, so the call must take well over 5 ms."""
    stamps: list[int] = []
    started = threading.Event()
    stop = False

    def stamp() -> None:
        started.set()
        while not stop:
            stamps.append(time.perf_counter_ns())

    t = threading.Thread(target=stamp)
    t.start()
    started.wait()
    try:
        t0 = time.perf_counter_ns()
        call()
        t1 = time.perf_counter_ns()
    finally:
        stop = True
        t.join()
    assert t1 - t0 > 40_000_000, "too short a call to tell"
    lo, hi = t0 + (t1 - t0) * 3 // 10, t0 + (t1 - t0) * 7 // 10
    return any(lo <= s <= hi for s in stamps)


def test_the_gil_is_released_while_a_batch_hashes() -> None:
    one = os.urandom(1 << 20)
    frags, hashes = [one] * 512, [h(one)] * 512  # 512 MiB to hash, 1 MiB of memory
    assert other_thread_ran_inside(lambda: first_mismatch(frags, hashes) == -1)


# -- VERIFY_IOV: the C check pyfuse3's checked replies call (no Python, no GIL) -----------


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _capsule_pointer(name: bytes) -> int:
    """VERIFY_IOV's pointer, asked for by `name` as pyfuse3 asks (PyCapsule_GetPointer):
    ValueError for another name."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get(VERIFY_IOV, name))


def _verify_iov() -> Callable[[list[bytes], bytes], int]:
    """VERIFY_IOV's function, called as pyfuse3 calls it: (iovecs, hashes, count)."""
    fn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.POINTER(_Iovec), ctypes.c_char_p,
                          ctypes.c_size_t)(_capsule_pointer(b"annofs.verify_iov"))

    def call(frags: list[bytes], hashes: bytes) -> int:
        bufs = [ctypes.create_string_buffer(f, len(f)) for f in frags]
        iov = (_Iovec * max(1, len(frags)))(
            *[_Iovec(ctypes.addressof(b), len(f)) for b, f in zip(bufs, frags, strict=True)])
        return int(fn(iov, hashes, len(frags)))

    return call


def test_the_capsule_is_named_as_pyfuse3_asks_and_wrong_names_are_refused() -> None:
    assert _capsule_pointer(b"annofs.verify_iov")
    with pytest.raises(ValueError):
        _capsule_pointer(b"something.else")


def test_verify_iov_names_the_first_fragment_whose_hash_differs() -> None:
    verify = _verify_iov()
    rng = random.Random(11)
    frags = [rng.randbytes(n) for n in SIZES]
    hashes = b"".join(h(f) for f in frags)
    assert verify(frags, hashes) == -1
    assert verify([], b"") == -1
    for k in (0, 5, len(frags) - 1):
        flipped = list(frags)
        if not frags[k]:  # nothing to flip in an empty fragment: give it a byte
            flipped[k] = b"x"
        else:
            at = rng.randrange(len(frags[k]))
            flipped[k] = frags[k][:at] + bytes([frags[k][at] ^ 1]) + frags[k][at + 1:]
        assert verify(flipped, hashes) == k
        # A wrong hash (not wrong bytes) is caught the same way.
        wrong = hashes[:32 * k] + h(b"other") + hashes[32 * (k + 1):]
        assert verify(frags, wrong) == k
        # Two bad ones (fragment 1's hash wrong too): the first is named.
        assert verify(flipped, hashes[:32] + h(b"other") + hashes[64:]) == min(k, 1)
