"""Key encodings: fixed-width big-endian integers so LMDB's byte order is numeric order."""

from __future__ import annotations

import struct

_U64 = struct.Struct(">Q")

HASH_SIZE = 32


def u64(n: int) -> bytes:
    """Encode an id as an 8-byte big-endian key."""
    return _U64.pack(n)


def from_u64(b: bytes | memoryview) -> int:
    """Decode an 8-byte big-endian key."""
    return _U64.unpack(b)[0]


def entry_key(dir_id: int, name: bytes) -> bytes:
    """Key of a directory entry: the directory's id, then the name (so a prefix scan lists it)."""
    return _U64.pack(dir_id) + name
