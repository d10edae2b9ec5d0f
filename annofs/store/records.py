"""The on-disk records and their one encoder/decoder each.

Every record is a msgpack array whose first element is the record layout's number, so a
later layout can be read beside an old one. Never pickle: a store may come from elsewhere,
and a record that does not decode is reported as corruption, not executed.

Layout 2 follows the array with a CRC-32 of it (4 bytes, big-endian): a flipped bit in a
record is caught when it is read, not used. Fragments carry their BLAKE3 hash; without
this a flipped bit in an entry's version id, a mode or a length would serve another
file's bytes or wrong metadata without any error. CRC-32 catches every error of up to 3
bits (and every burst up to 32) in records this size; bit rot is not an adversary.
Layout 1 records (written before checksums) are still read, unchecked.

Layout 3 (version records only) stores fragment lengths as uint64 and may hold holes:
an entry whose hash is HOLE (32 zero bytes, which no BLAKE3 output is) stands for that
many zero bytes that are not stored. A version without holes whose lengths fit in 32
bits is still written as layout 2, byte for byte as before, so stores written before
holes read unchanged, and a binary without holes refuses a layout-3 record by its
layout number instead of misreading it.
"""

from __future__ import annotations

import functools
import stat
import struct
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack

from annofs.errors import CorruptionError
from annofs.store.keys import HASH_SIZE

_LAYOUT = 2
_UNCHECKED_LAYOUT = 1
_WIDE_LAYOUT = 3  # version records with uint64 lengths and holes
_CRC = struct.Struct(">I")

HOLE = bytes(HASH_SIZE)
"""The hash of a hole entry in a version's fragment list: zeros, not stored."""

_U32_MAX = (1 << 32) - 1


def _pack(fields: list[Any], layout: int = _LAYOUT) -> bytes:
    body = msgpack.packb([layout, *fields], use_bin_type=True)
    return body + _CRC.pack(zlib.crc32(body))


def _unpack(raw: bytes | memoryview, what: str, nfields: int) -> list[Any]:
    return _unpack_layout(raw, what, nfields)[1]


def _unpack_layout(raw: bytes | memoryview, what: str, nfields: int,
                   checked_layouts: tuple[int, ...] = (_LAYOUT,)) -> tuple[int, list[Any]]:
    view = memoryview(raw)
    n = len(view) - _CRC.size
    checked = n > 0 and zlib.crc32(view[:n]) == _CRC.unpack_from(view, n)[0]
    try:
        rec = msgpack.unpackb(view[:n] if checked else view, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        # Not a whole record, and no checksum matches: damaged (or not a record at all).
        raise CorruptionError(f"{what}: record does not decode and does not match its "
                              f"checksum ({e})") from e
    if not isinstance(rec, list) or len(rec) != nfields + 1:
        raise CorruptionError(f"{what}: record has an unknown layout")
    if rec[0] in checked_layouts and not checked:
        raise CorruptionError(f"{what}: record of layout {rec[0]} does not match its "
                              f"checksum (damaged on disk)")
    if not (rec[0] in checked_layouts if checked else rec[0] == _UNCHECKED_LAYOUT):
        raise CorruptionError(f"{what}: record has an unknown layout")
    return rec[0], rec[1:]


def _check_ints(what: str, *values: object, signed: bool = False) -> None:
    """Integer fields must be ints (non-negative unless `signed`): a record may lie."""
    for v in values:
        if type(v) is not int or (v < 0 and not signed):
            raise CorruptionError(f"{what}: bad field {v!r}")


def _check_bytes(what: str, *values: object) -> None:
    for v in values:
        if not isinstance(v, bytes):
            raise CorruptionError(f"{what}: bad field {v!r:.40}")


@dataclass(frozen=True)
class Edit:
    """Which fragment range of the parent version was replaced by which range of this one."""

    start: int  # index of the first changed fragment (same in parent and child)
    removed: int  # fragments of the parent replaced
    added: int  # fragments of this version in their place


@dataclass(frozen=True)
class Version:
    """One node of the edit graph: a file's content as a fragment list.

    `hashes` is the fragments' BLAKE3 hashes concatenated, `lengths` their sizes as a
    uint32 array ("I"), or uint64 ("Q") once the list holds a hole or a length past 32
    bits: packed, so a new version of a 65k-fragment file is a memcpy, not a loop. An
    entry whose hash is HOLE is a hole: that many zero bytes, stored as nothing.
    `digest` is BLAKE3 of the whole content; None until computed (a small edit to a huge
    file must not wait for hashing all of it).
    """

    id: int
    parent: int
    size: int
    digest: bytes | None
    created_ns: int
    edit: Edit | None
    hashes: bytes
    lengths: array = field(repr=False)

    @property
    def count(self) -> int:
        """Number of fragments."""
        return len(self.lengths)

    def fragment_hash(self, i: int) -> bytes:
        """The hash of fragment i."""
        return self.hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE]

    def is_hole(self, i: int) -> bool:
        """Whether entry i is a hole (zeros, not stored)."""
        return self.hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE] == HOLE

    @property
    def may_have_holes(self) -> bool:
        """False when the list certainly has no hole (holes are only in wide lists)."""
        return self.lengths.typecode == "Q"

    def hole_indexes(self) -> list[int]:
        """The indexes of the hole entries, ascending (a scan in C, not per entry)."""
        if not self.may_have_holes:
            return []
        return hole_indexes(self.hashes)

    @functools.cached_property
    def stored_size(self) -> int:
        """Bytes of the content that are data, not holes (computed once per object)."""
        if not self.may_have_holes:
            return self.size
        return self.size - sum(self.lengths[i] for i in self.hole_indexes())


def hole_indexes(hashes: bytes) -> list[int]:
    """Indexes of the HOLE entries in a concatenation of fragment hashes."""
    out = []
    pos = hashes.find(HOLE)
    while pos >= 0:
        if pos % HASH_SIZE == 0:
            out.append(pos // HASH_SIZE)
            pos = hashes.find(HOLE, pos + HASH_SIZE)
        else:  # zeros straddling two real hashes: not an entry
            pos = hashes.find(HOLE, pos + 1)
    return out


def lengths_array(hashes: bytes, lengths: Any) -> array:
    """`lengths` as the array a version keeps: uint32 unless the list holds a hole or a
    length past 32 bits, which need the wide (layout 3) form. Cheap for the usual case
    (no hole: one substring search of the hashes, no pass over the lengths)."""
    a = lengths if isinstance(lengths, array) else array("Q", lengths)

    def has_hole() -> bool:
        return HOLE in hashes and bool(hole_indexes(hashes))

    if a.typecode == "I":
        return array("Q", a) if has_hole() else a
    if a.typecode == "Q" and (has_hole() or (len(a) > 0 and max(a) > _U32_MAX)):
        return a
    return array("I", a)


def version_layout(raw: bytes | memoryview) -> int | None:
    """The layout number of an encoded version record, read from its first two bytes
    without decoding it (None if it does not start as a version record does)."""
    if len(raw) >= 2 and raw[0] == 0x98 and raw[1] in (_UNCHECKED_LAYOUT, _LAYOUT, _WIDE_LAYOUT):
        return raw[1]
    return None


def is_wide_version(raw: bytes | memoryview) -> bool:
    """Whether an encoded version record may hold holes (layout 3)."""
    return version_layout(raw) == _WIDE_LAYOUT


def encode_version(v: Version) -> bytes:
    """Encode a version record: layout 3 (uint64 lengths, holes) for a wide list, else the
    layout every store has always had."""
    edit = [v.edit.start, v.edit.removed, v.edit.added] if v.edit else None
    lengths = v.lengths
    if lengths.typecode not in ("I", "Q"):
        lengths = lengths_array(v.hashes, lengths)
    layout = _WIDE_LAYOUT if lengths.typecode == "Q" else _LAYOUT
    return _pack([v.parent, v.size, v.digest, v.created_ns, edit, v.hashes, lengths.tobytes()],
                 layout)


def decode_version(vid: int, raw: bytes | memoryview) -> Version:
    """Decode a version record, checking that its fragment list is self-consistent."""
    what = f"version {vid}"
    layout, fields = _unpack_layout(raw, what, 7, (_LAYOUT, _WIDE_LAYOUT))
    parent, size, digest, created, edit, hashes, lengths_raw = fields
    # Inline tests for the usual record, the naming checks for any other (as decode_attrs).
    if not (type(parent) is int and type(size) is int and parent >= 0 and size >= 0):
        _check_ints(what, parent, size)
    if type(created) is not int:
        _check_ints(what, created, signed=True)
    if type(hashes) is not bytes or type(lengths_raw) is not bytes:
        _check_bytes(what, hashes, lengths_raw)
    if digest is not None:
        _check_bytes(what, digest)
    if edit is not None:
        if not isinstance(edit, list) or len(edit) != 3:
            raise CorruptionError(f"{what}: bad edit")
        _check_ints(what, *edit)
    lengths = array("Q" if layout == _WIDE_LAYOUT else "I")
    try:
        lengths.frombytes(lengths_raw)
    except (TypeError, ValueError) as e:
        raise CorruptionError(f"{what}: bad fragment lengths") from e
    if len(hashes) != HASH_SIZE * len(lengths) or sum(lengths) != size:
        raise CorruptionError(f"{what}: fragment list does not match its size")
    if digest is not None and len(digest) != HASH_SIZE:
        raise CorruptionError(f"{what}: bad digest")
    return Version(
        vid, parent, size, digest, created, Edit(*edit) if edit else None, hashes, lengths
    )


@dataclass(frozen=True)
class Attrs:
    """A namespace entry's inode attributes.

    `target` depends on the type in `mode`: a version id for a regular file, a dir id for
    a directory, the link's bytes for a symlink, the device number for a device node.
    `link` is non-zero for a hard-linked file: its attributes then live in the link record.
    Times are nanoseconds since the epoch.
    """

    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    target: int | bytes
    link: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def encode_attrs(a: Attrs) -> bytes:
    """Encode an entry (or a link record's attributes)."""
    return _pack(
        [a.mode, a.uid, a.gid, a.size, a.atime_ns, a.mtime_ns, a.ctime_ns, a.target, a.link,
         a.xattrs]
    )


def decode_attrs(raw: bytes | memoryview, what: str) -> Attrs:
    """Decode an entry record."""
    mode, uid, gid, size, atime, mtime, ctime, target, link, xattrs = _unpack(raw, what, 10)
    # The usual record passes these tests inline; any other goes through the checks
    # that name the bad field (every directory walk decodes each entry: measured).
    if not (type(mode) is int and type(uid) is int and type(gid) is int
            and type(size) is int and type(link) is int and mode >= 0 and uid >= 0
            and gid >= 0 and size >= 0 and link >= 0):
        _check_ints(what, mode, uid, gid, size, link)
    if not (type(atime) is int and type(mtime) is int and type(ctime) is int):
        _check_ints(what, atime, mtime, ctime, signed=True)  # times before 1970 are valid
    if type(target) is not bytes and (type(target) is not int or target < 0):
        raise CorruptionError(f"{what}: bad target")
    if xattrs != {} and (not isinstance(xattrs, dict) or not all(
            isinstance(k, bytes) and isinstance(v, bytes) for k, v in xattrs.items())):
        raise CorruptionError(f"{what}: bad extended attributes")
    return Attrs(mode, uid, gid, size, atime, mtime, ctime, target, link, xattrs)


@dataclass(frozen=True)
class DirHeader:
    """A directory node: shared between trees while `refcount` > 1 (copy-on-write)."""

    refcount: int
    nsubdirs: int


def encode_dir(h: DirHeader) -> bytes:
    """Encode a directory header."""
    return _pack([h.refcount, h.nsubdirs])


def decode_dir(dir_id: int, raw: bytes | memoryview) -> DirHeader:
    """Decode a directory header."""
    what = f"directory {dir_id}"
    refcount, nsubdirs = _unpack(raw, what, 2)
    _check_ints(what, refcount, nsubdirs)
    return DirHeader(refcount, nsubdirs)


@dataclass(frozen=True)
class Link:
    """A hard-linked file: the attributes every one of its names shares, and how many."""

    nlink: int
    attrs: Attrs


def encode_link(link: Link) -> bytes:
    """Encode a link record."""
    return _pack([link.nlink, encode_attrs(link.attrs)])


def decode_link(link_id: int, raw: bytes | memoryview) -> Link:
    """Decode a link record."""
    what = f"link {link_id}"
    nlink, attrs = _unpack(raw, what, 2)
    _check_ints(what, nlink)
    _check_bytes(what, attrs)
    return Link(nlink, decode_attrs(attrs, what))
