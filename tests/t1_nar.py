"""Nix base32 against values the real Nix printed, and the NAR reader's strictness:
every malformation in tests/nar_cases.py is a NarError saying where; valid archives read
back as written; a hypothesis fuzz run finds no other exception."""

from __future__ import annotations

import io
import os
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nar_cases import GOOD, MALFORMED, deep, directory, entry, nar, regular, symlink

from annofs.errors import UsageError
from annofs.transfer import nixbase32 as base32
from annofs.transfer.nar import NarEntry, NarError, NarReader, nar_hash

# (bytes, what `nix-hash --flat --base32` / `nix-hash --to-base32` printed for them)
NIX_BASE32 = [
    (bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
     "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),  # sha256 of ""
    (bytes.fromhex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
     "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"),  # sha256 of "abc"
    (bytes.fromhex("a9993e364706816aba3e25717850c26c9cd0d89d"),
     "kpcd173cq987hw957sx6m0868wv3x6d9"),  # sha1 of "abc": a store path's length
    (bytes.fromhex("900150983cd24fb0d6963f7d28e17f72"), "3jgzhjhz9zjvbb0kyj7jc500ch"),
    (bytes.fromhex("00" * 31 + "01"), "0080000000000000000000000000000000000000000000000000"),
    (bytes.fromhex("ff" + "00" * 31), "000000000000000000000000000000000000000000000000007z"),
    (b"\xff" * 32, "1zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"),
]


@pytest.mark.parametrize(("raw", "text"), NIX_BASE32)
def test_base32_matches_nix(raw: bytes, text: str) -> None:
    assert base32.encode(raw) == text
    assert base32.decode(text) == raw
    assert base32.decode(text, len(raw)) == raw
    assert base32.encoded_length(len(raw)) == len(text)


@pytest.mark.parametrize(("text", "size", "message"), [
    ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7e", 32, "character 'e' at 51"),
    ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7u", None, "character 'u'"),
    ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7", 32, "51 characters, expected 52"),
    ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", 20, "expected 32"),
    ("2zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", 32, "bits beyond 32 bytes"),
    ("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", None, "bits beyond"),
    ("000", None, "is not the length of any"),
    ("0MDQA9W1P6CMLI6976V4WI0SW9R4P5PRKJ7LZFD1877WK11C9C73", 32, "character 'M'"),
])
def test_base32_decode_is_strict(text: str, size: int | None, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        base32.decode(text, size, what="NarHash")
    assert "\n" not in str(e.value) and str(e.value).startswith("NarHash ")


def test_base32_round_trips_every_length() -> None:
    for n in range(0, 70):
        raw = os.urandom(n)
        assert base32.decode(base32.encode(raw)) == raw


def read_all(data: bytes) -> tuple[list[tuple[NarEntry, bytes]], NarReader]:
    """Every entry with its contents, and the reader (for its hash)."""
    r = NarReader(io.BytesIO(data))
    out = []
    for e in r.entries():
        out.append((e, e.contents.read() if e.contents is not None else b""))
    return out, r


def test_reader_reads_what_was_written() -> None:
    got, r = read_all(GOOD)
    assert [(e.path, e.kind, e.executable, e.target, body) for e, body in got] == [
        ((), "directory", False, b"", b""),
        ((b"a",), "regular", False, b"", b"hello"),
        ((b"b",), "directory", False, b"", b""),
        ((b"b", b"c"), "symlink", False, b"../a", b""),
        ((b"x",), "regular", True, b"", b"#!/bin/sh\n"),
    ]
    assert r.hash == nar_hash([GOOD])


def test_reader_skips_unread_contents_and_still_checks_them() -> None:
    # A consumer that ignores a file's bytes: they are read (hashed) anyway.
    r = NarReader(io.BytesIO(GOOD))
    assert [e.path for e in r.entries()] == [(), (b"a",), (b"b",), (b"b", b"c"), (b"x",)]
    assert r.hash == nar_hash([GOOD])
    r = NarReader(io.BytesIO(nar(regular(b"hello")).replace(b"hello\0\0\0", b"hello\0\1\0")))
    with pytest.raises(NarError, match="non-zero padding"):
        list(r.entries())


def test_reader_takes_single_file_and_symlink_archives() -> None:
    got, _ = read_all(nar(regular(b"", executable=True)))
    assert [(e.path, e.kind, e.executable, body) for e, body in got] == [
        ((), "regular", True, b"")]
    got, _ = read_all(nar(symlink(b"/abs/target")))
    assert got[0][0].target == b"/abs/target"
    got, _ = read_all(deep(256))
    assert len(got[-1][0].path) == 256


@pytest.mark.parametrize(("case", "data", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_reader_rejects(case: str, data: bytes, message: str) -> None:
    with pytest.raises(NarError) as e:
        read_all(data)
    text = str(e.value)
    assert message in text
    assert "\n" not in text
    assert re.match(r"NAR: byte \d+, entry /", text), text


def test_error_names_offset_and_entry() -> None:
    data = nar(directory(entry(b"d", directory(entry(b"ok", regular(b"")),
                                               entry(b"..", regular(b"x"))))))
    with pytest.raises(NarError) as e:
        read_all(data)
    offset = data.index(b"\x02\0\0\0\0\0\0\0..")
    assert str(e.value) == f"NAR: byte {offset}, entry /d/..: name '..' is not allowed"


def test_every_truncation_is_an_error() -> None:
    for n in range(len(GOOD)):
        with pytest.raises(NarError, match="truncated"):
            read_all(GOOD[:n])


def test_short_reads_do_not_matter() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: memoryview) -> int:  # type: ignore[override]
            n = min(3, len(b), len(self.data) - self.pos)
            b[:n] = self.data[self.pos : self.pos + n]
            self.pos += n
            return n

    data = nar(directory(entry(b"big", regular(os.urandom(100_000))), entry(b"s", symlink(b"t"))))
    r = NarReader(Trickle(data))  # type: ignore[arg-type]
    bodies = [e.contents.read() if e.contents else b"" for e in r.entries()]
    assert bodies[1] == data[data.index(struct.pack("<Q", 100_000)) + 8:][:100_000]
    assert r.hash == nar_hash([data])


# -- fuzzing ------------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("ANNOFS_FUZZ_EXAMPLES", "300"))
SEEDS = [GOOD, nar(regular(b"x" * 20, executable=True)), nar(symlink(b"t")), deep(3)]


def _consume(data: bytes) -> None:
    try:
        read_all(data)
    except NarError as e:
        assert "\n" not in str(e)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                        max_size=4),
       st.integers(0, 1 << 16), st.binary(max_size=16))
def test_fuzz_mutated_nars(seed: bytes, flips: list[tuple[int, int]], cut: int,
                           extra: bytes) -> None:
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut % 3 == 0:
        del data[cut % len(data):]
    elif cut % 3 == 1:
        at = cut % len(data)
        data[at:at] = extra
    _consume(bytes(data))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _consume(data)
    _consume(nar(b"") + data)  # past the magic, where the grammar starts
