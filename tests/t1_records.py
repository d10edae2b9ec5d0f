"""Record encodings (annofs/store/records.py): round trips, and corruption never decoding.

Every stored record is one msgpack array. A record that does not decode, or decodes to
values of the wrong type or a fragment list that contradicts itself, must raise
CorruptionError: the layers above map that to EIO / exit 1, while any other exception
would escape as a crash (or, worse, a wrong answer computed from a wrong-typed field).
"""

from __future__ import annotations

import contextlib
import random
import stat
import struct
import zlib
from array import array
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annofs.errors import CorruptionError
from annofs.store.keys import HASH_SIZE, entry_key, from_u64, u64
from annofs.store.records import (
    HOLE,
    Attrs,
    DirHeader,
    Edit,
    Link,
    Version,
    decode_attrs,
    decode_dir,
    decode_link,
    decode_version,
    encode_attrs,
    encode_dir,
    encode_link,
    encode_version,
    hole_indexes,
    lengths_array,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U32 = st.integers(0, 2**32 - 1)
U63 = st.integers(0, 2**63 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
HASH = st.binary(min_size=HASH_SIZE, max_size=HASH_SIZE)


# -- strategies ----------------------------------------------------------------------------


@st.composite
def versions(draw: st.DrawFn) -> Version:
    lengths = draw(st.lists(st.integers(1, 2**20), max_size=20))
    hashes = b"".join(draw(st.lists(HASH, min_size=len(lengths), max_size=len(lengths))))
    edit = draw(st.none() | st.builds(Edit, U32, U32, U32))
    return Version(
        id=draw(U63),
        parent=draw(U63),
        size=sum(lengths),
        digest=draw(st.none() | HASH),
        created_ns=draw(U63),
        edit=edit,
        hashes=hashes,
        lengths=array("I", lengths),
    )


MODES = st.sampled_from([stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFCHR])


@st.composite
def attrs(draw: st.DrawFn) -> Attrs:
    kind = draw(MODES)
    target: int | bytes = (
        draw(st.binary(min_size=1, max_size=300)) if kind == stat.S_IFLNK else draw(U63)
    )
    return Attrs(
        mode=kind | draw(st.integers(0, 0o7777)),
        uid=draw(U32),
        gid=draw(U32),
        size=draw(U63),
        atime_ns=draw(I64),
        mtime_ns=draw(I64),
        ctime_ns=draw(I64),
        target=target,
        link=draw(U63),
        xattrs=draw(st.dictionaries(st.binary(min_size=1, max_size=40),
                                    st.binary(max_size=200), max_size=4)),
    )


dirs = st.builds(DirHeader, U63, U63)
links = st.builds(Link, st.integers(1, 2**32), attrs())


def _versions_equal(a: Version, b: Version) -> bool:
    # array compares by value, but spell out every field so a dropped one shows.
    return (a.id, a.parent, a.size, a.digest, a.created_ns, a.edit, a.hashes, list(a.lengths)) \
        == (b.id, b.parent, b.size, b.digest, b.created_ns, b.edit, b.hashes, list(b.lengths))


# -- round trips ---------------------------------------------------------------------------


@FAST
@given(versions())
def test_version_round_trip(v: Version) -> None:
    raw = encode_version(v)
    back = decode_version(v.id, raw)
    assert _versions_equal(back, v)
    assert back.count == len(v.lengths)
    for i in range(v.count):
        assert back.fragment_hash(i) == v.hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE]
    # A memoryview (what a buffers=True LMDB transaction gives) decodes the same.
    assert _versions_equal(decode_version(v.id, memoryview(raw)), v)


@FAST
@given(attrs())
def test_attrs_round_trip(a: Attrs) -> None:
    back = decode_attrs(encode_attrs(a), "entry")
    assert back == a
    assert back.is_dir == stat.S_ISDIR(a.mode)
    assert back.is_reg == stat.S_ISREG(a.mode)
    assert back.is_symlink == stat.S_ISLNK(a.mode)


@FAST
@given(dirs)
def test_dir_round_trip(h: DirHeader) -> None:
    assert decode_dir(7, encode_dir(h)) == h


@FAST
@given(links)
def test_link_round_trip(link: Link) -> None:
    assert decode_link(3, encode_link(link)) == link


def test_empty_version_round_trip() -> None:
    v = Version(0, 0, 0, bytes(32), 1, None, b"", array("I"))
    assert _versions_equal(decode_version(0, encode_version(v)), v)


@FAST
@given(U63, U63, st.binary(max_size=255))
def test_keys_are_ordered_like_their_numbers(a: int, b: int, name: bytes) -> None:
    assert from_u64(u64(a)) == a
    assert (u64(a) < u64(b)) == (a < b)
    key = entry_key(a, name)
    assert key[:8] == u64(a) and key[8:] == name


# -- garbage, truncation, bit flips --------------------------------------------------------

Decoder = Callable[[bytes], Any]

DECODERS: dict[str, Decoder] = {
    "version": lambda raw: decode_version(1, raw),
    "attrs": lambda raw: decode_attrs(raw, "entry"),
    "dir": lambda raw: decode_dir(1, raw),
    "link": lambda raw: decode_link(1, raw),
}


def _samples() -> dict[str, bytes]:
    a = Attrs(stat.S_IFREG | 0o644, 1000, 100, 5, 1, 2, 3, 42, 0, {b"user.k": b"v"})
    return {
        "version": encode_version(Version(
            9, 3, 12, bytes(range(32)), 123, Edit(1, 2, 3),
            bytes(range(64)), array("I", [5, 7]))),
        "attrs": encode_attrs(a),
        "dir": encode_dir(DirHeader(2, 1)),
        "link": encode_link(Link(2, a)),
    }


SAMPLES = _samples()


def _fields(kind: str) -> Any:
    """A sample record's msgpack array (its layout number first), without the checksum."""
    return msgpack.unpackb(SAMPLES[kind][:-4])


def _repack(fields: Any) -> bytes:
    """Pack as a record of layout 2 is stored: msgpack, then a CRC-32 of it, so a test
    reaches the decoder's checks behind the checksum."""
    body = msgpack.packb(fields, use_bin_type=True)
    return body + struct.pack(">I", zlib.crc32(body))


def _decodes_or_corrupt(decode: Decoder, raw: bytes) -> None:
    with contextlib.suppress(CorruptionError):
        decode(raw)


@pytest.mark.parametrize("kind", DECODERS)
@FAST
@given(raw=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_corruption(kind: str, raw: bytes) -> None:
    _decodes_or_corrupt(DECODERS[kind], raw)


@pytest.mark.parametrize("kind", DECODERS)
def test_every_truncation_is_corruption(kind: str) -> None:
    raw = SAMPLES[kind]
    for n in range(len(raw)):
        with pytest.raises(CorruptionError):
            DECODERS[kind](raw[:n])


@pytest.mark.parametrize("kind", DECODERS)
def test_trailing_bytes_are_corruption(kind: str) -> None:
    with pytest.raises(CorruptionError):
        DECODERS[kind](SAMPLES[kind] + b"\x00")


@pytest.mark.parametrize("kind", DECODERS)
def test_byte_flips_never_raise_anything_but_corruption(kind: str) -> None:
    raw = SAMPLES[kind]
    rng = random.Random(kind)
    for pos in range(len(raw)):
        for mask in {0x01, 0x80, 0xFF, rng.randrange(1, 256)}:
            flipped = bytearray(raw)
            flipped[pos] ^= mask
            _decodes_or_corrupt(DECODERS[kind], bytes(flipped))


@pytest.mark.parametrize("kind", DECODERS)
def test_every_bit_flip_is_corruption(kind: str) -> None:
    """Bit rot in a stored record is caught by its checksum: never decoded, never used."""
    raw = SAMPLES[kind]
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptionError, match="checksum"):
            DECODERS[kind](bytes(flipped))


@pytest.mark.parametrize("kind", DECODERS)
def test_layout_2_without_its_checksum_is_corruption(kind: str) -> None:
    with pytest.raises(CorruptionError, match="checksum"):
        DECODERS[kind](SAMPLES[kind][:-4])


@pytest.mark.parametrize("kind", ["version", "attrs", "dir"])
def test_layout_1_records_are_still_read(kind: str) -> None:
    """Records written before checksums (layout 1: no trailer) decode as they did."""
    fields = _fields(kind)
    fields[0] = 1
    legacy = msgpack.packb(fields, use_bin_type=True)
    assert DECODERS[kind](legacy) == DECODERS[kind](SAMPLES[kind])


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("layout", [0, 3, 4, -1, "1", None])
def test_unknown_layout_is_corruption(kind: str, layout: object) -> None:
    if kind == "version" and layout == 3:
        layout = 5  # layout 3 is a version's wide form (holes): tested below
    fields = _fields(kind)
    fields[0] = layout
    with pytest.raises(CorruptionError, match="layout"):
        DECODERS[kind](_repack(fields))


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("delta", [-1, +1])
def test_wrong_field_count_is_corruption(kind: str, delta: int) -> None:
    fields = _fields(kind)
    fields = fields[:-1] if delta < 0 else [*fields, 0]
    with pytest.raises(CorruptionError):
        DECODERS[kind](_repack(fields))


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("value", [{1: 2}, "not a list", 5, None, b"bytes"])
def test_not_an_array_is_corruption(kind: str, value: object) -> None:
    with pytest.raises(CorruptionError):
        DECODERS[kind](_repack(value))


# Each record's fields (after the layout number) and what a decoded value may be.
_INT = (int,)
FIELD_TYPES: dict[str, list[tuple[str, tuple[type, ...]]]] = {
    "version": [("parent", _INT), ("size", _INT), ("digest", (bytes, type(None))),
                ("created_ns", _INT), ("edit", (list, type(None))), ("hashes", (bytes,)),
                ("lengths", (bytes,))],
    "attrs": [("mode", _INT), ("uid", _INT), ("gid", _INT), ("size", _INT),
              ("atime_ns", _INT), ("mtime_ns", _INT), ("ctime_ns", _INT),
              ("target", (int, bytes)), ("link", _INT), ("xattrs", (dict,))],
    "dir": [("refcount", _INT), ("nsubdirs", _INT)],
    "link": [("nlink", _INT), ("attrs", (bytes,))],
}
WRONG_VALUES: list[object] = ["text", b"\x01\x02\x03\x04", 7, 1.5, [1, 2], {b"k": b"v"}, None]


def _well_typed(kind: str, rec: Any) -> bool:
    """Whether a decoded record has fields of the types its dataclass declares."""
    if kind == "version":
        edit_ok = rec.edit is None or all(
            isinstance(getattr(rec.edit, f), int) for f in ("start", "removed", "added"))
        return (isinstance(rec.parent, int) and isinstance(rec.size, int)
                and isinstance(rec.created_ns, int) and isinstance(rec.hashes, bytes)
                and (rec.digest is None or isinstance(rec.digest, bytes)) and edit_ok)
    if kind == "attrs":
        return _attrs_well_typed(rec)
    if kind == "dir":
        return isinstance(rec.refcount, int) and isinstance(rec.nsubdirs, int)
    return isinstance(rec.nlink, int) and _attrs_well_typed(rec.attrs)


def _attrs_well_typed(a: Attrs) -> bool:
    ints = (a.mode, a.uid, a.gid, a.size, a.atime_ns, a.mtime_ns, a.ctime_ns, a.link)
    return (all(isinstance(x, int) for x in ints) and isinstance(a.target, int | bytes)
            and isinstance(a.xattrs, dict))


def _misdecoded(kind: str, fields: list[Any]) -> str | None:
    """None if the record raises CorruptionError or decodes well typed, else what went wrong."""
    raw = _repack(fields)
    try:
        rec = DECODERS[kind](raw)
    except CorruptionError:
        return None
    except Exception as e:
        return f"raised {type(e).__name__}: {e}"
    return None if _well_typed(kind, rec) else f"decoded to {rec!r}"[:140]


@pytest.mark.parametrize("kind", FIELD_TYPES)
def test_wrongly_typed_field_is_corruption(kind: str) -> None:
    """A well-formed msgpack array with one field of the wrong type (what a flipped type
    byte gives) raises CorruptionError: it neither crashes with another exception nor
    decodes to a record whose fields are of the wrong type (which would crash later, far
    from the cause, or be used as data)."""
    problems = []
    for i, (name, ok) in enumerate(FIELD_TYPES[kind]):
        for value in WRONG_VALUES:
            if isinstance(value, ok):
                continue
            fields = _fields(kind)
            fields[1 + i] = value
            problem = _misdecoded(kind, fields)
            if problem:
                problems.append(f"{name}={value!r}: {problem}")
    if problems:
        pytest.fail(f"{len(problems)} wrongly typed {kind} records:\n" + "\n".join(problems))


def test_malformed_edit_is_corruption() -> None:
    problems = []
    for edit in ([1, 2], [1, 2, 3, 4], 3, "abc", [b"a", b"b", b"c"]):
        fields = _fields("version")
        fields[5] = edit
        problem = _misdecoded("version", fields)
        if problem:
            problems.append(f"edit={edit!r}: {problem}")
    if problems:
        pytest.fail("\n".join(problems))


# -- version self-consistency --------------------------------------------------------------


def _version_fields(**change: Any) -> bytes:
    """A valid version record (two fragments, 5 + 7 bytes) with some fields replaced."""
    names = ["parent", "size", "digest", "created_ns", "edit", "hashes", "lengths"]
    fields = dict(zip(names, _fields("version")[1:], strict=True))
    fields.update(change)
    return _repack([2, *(fields[n] for n in names)])


def test_sample_version_is_consistent() -> None:
    v = decode_version(9, _version_fields())
    assert (v.size, list(v.lengths), v.count) == (12, [5, 7], 2)


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"size": 13}, "size larger than the fragments"),
        ({"size": 11}, "size smaller than the fragments"),
        ({"size": 0}, "size zero with fragments"),
        ({"hashes": bytes(range(63))}, "hashes one byte short"),
        ({"hashes": bytes(range(65))}, "hashes one byte long"),
        ({"hashes": bytes(range(96))}, "three hashes for two lengths"),
        ({"hashes": b""}, "no hashes for two lengths"),
        ({"lengths": array("I", [5, 7]).tobytes()[:-1]}, "lengths not whole uint32s"),
        ({"lengths": array("I", [12]).tobytes()}, "one length for two hashes"),
        ({"lengths": array("I", [5, 7, 0]).tobytes(), "hashes": bytes(range(64))},
         "three lengths for two hashes"),
        ({"digest": bytes(31)}, "digest too short"),
        ({"digest": bytes(33)}, "digest too long"),
        ({"digest": b""}, "digest empty"),
    ],
)
def test_inconsistent_version_is_corruption(change: dict[str, Any], what: str) -> None:
    with pytest.raises(CorruptionError, match="version 4"):
        decode_version(4, _version_fields(**change))


def test_version_without_digest_is_valid() -> None:
    assert decode_version(1, _version_fields(digest=None)).digest is None


# -- holes (layout 3) ----------------------------------------------------------------------


def test_version_with_a_hole_round_trips_as_layout_3() -> None:
    """A hole is an entry whose hash is HOLE; its length may pass 32 bits."""
    h = bytes(range(32))
    huge = 1 << 50
    v = Version(7, 3, 5 + huge, None, 11, Edit(0, 0, 2), h + HOLE, array("Q", [5, huge]))
    raw = encode_version(v)
    assert msgpack.unpackb(raw[:-4])[0] == 3
    back = decode_version(7, raw)
    assert back.lengths.typecode == "Q" and list(back.lengths) == [5, huge]
    assert [back.is_hole(i) for i in range(2)] == [False, True]
    assert back.stored_size == 5 and back.hole_indexes() == [1]


def test_version_without_holes_keeps_layout_2_bytes() -> None:
    """Stores written before holes read unchanged, and new dense versions are written as
    before: a wide array without holes is narrowed, not written as layout 3."""
    h = bytes(range(64))
    narrow = Version(4, 0, 12, None, 1, None, h, array("I", [5, 7]))
    assert msgpack.unpackb(encode_version(narrow)[:-4])[0] == 2
    assert lengths_array(h, array("Q", [5, 7])).typecode == "I"
    assert decode_version(4, encode_version(narrow)).lengths.typecode == "I"


def test_hole_indexes_ignore_zeros_across_two_hashes() -> None:
    a = bytes(range(1, 17)) + bytes(16)  # ends in 16 zero bytes
    b = bytes(16) + bytes(range(1, 17))  # starts with 16: 32 zeros straddle a and b
    assert hole_indexes(a + b) == []
    assert hole_indexes(a + b + HOLE) == [2]
