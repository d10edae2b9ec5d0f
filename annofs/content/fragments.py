"""Fragments: each distinct chunk stored once under its BLAKE3 hash, checked on every read.

A fragment's value is exactly its bytes. A one-byte codec prefix was measured to cut
store throughput from ~1980 MB/s to ~330 MB/s (the concatenation and LMDB's handling of
the odd-sized value); compression, if it comes, gets its own database.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Set

import blake3
import lmdb

from annofs.errors import CorruptionError
from annofs.store import Store

_COUNT = struct.Struct(">Q")


def fragment_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte BLAKE3 hash that names a fragment."""
    return blake3.blake3(data).digest()


class FragmentStore:
    """Fragment payloads and their reference counts: how many stored versions' edits added
    each (see versions.own_counts)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._data = store.db["fragments"]
        self._refs = store.db["fragrefs"]

    def put(self, txn: lmdb.Transaction, h: bytes, data: bytes | memoryview) -> bool:
        """Store a fragment unless present; True if it was new. Refcounts are separate."""
        # overwrite=False makes the presence check and the insert one B-tree descent.
        return txn.put(h, data, db=self._data, overwrite=False)

    def has(self, txn: lmdb.Transaction, h: bytes) -> bool:
        """Whether a fragment is stored."""
        return txn.get(h, db=self._data) is not None

    def get(self, txn: lmdb.Transaction, h: bytes) -> bytes:
        """A fragment's bytes, checked against its hash: CorruptionError, never wrong bytes."""
        raw = txn.get(h, db=self._data)
        if raw is None:
            raise CorruptionError(f"fragment {h.hex()}: missing from the store")
        if blake3.blake3(raw).digest() != h:
            raise CorruptionError(f"fragment {h.hex()}: content does not match its hash")
        return raw

    def refcount(self, txn: lmdb.Transaction, h: bytes) -> int:
        """How many stored version positions use the fragment."""
        raw = txn.get(h, db=self._refs)
        return _COUNT.unpack(raw)[0] if raw is not None else 0

    def add_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int]) -> None:
        """Add occurrences (a new version was stored)."""
        for h, n in counts.items():
            txn.put(h, _COUNT.pack(self.refcount(txn, h) + n), db=self._refs)

    def drop_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int],
                  keep: Set[bytes] = frozenset()) -> int:
        """Remove occurrences; delete fragments nothing uses (except those in `keep`, which
        a version not stored yet relies on). Returns bytes freed."""
        freed = 0
        for h, n in counts.items():
            left = self.refcount(txn, h) - n
            if left > 0:
                txn.put(h, _COUNT.pack(left), db=self._refs)
                continue
            txn.delete(h, db=self._refs)
            if h in keep:
                continue
            raw = txn.get(h, db=self._data)
            if raw is not None:
                freed += len(raw)
                txn.delete(h, db=self._data)
        return freed
