"""Fragments: each distinct chunk stored once under its BLAKE3 hash, checked on every read.

This module is the only reader and writer of fragment bytes and of their reference
counts (the `fragments` and `fragrefs` databases): gc, fsck, repair, import, the mount's
reads and writes all go through `FragmentStore`, so how fragments are laid out on disk
is decided here alone. Sizes it reports are *stored* bytes (what freeing gives back).

A fragment's value is exactly its bytes. A one-byte codec prefix was measured to cut
store throughput from ~1980 MB/s to ~330 MB/s (the concatenation and LMDB's handling of
the odd-sized value); compression, if it comes, gets its own database.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Set

import blake3
import lmdb

from annofs.errors import CorruptionError
from annofs.store import Store

_COUNT = struct.Struct(">Q")
# Unreferenced fragments are freed in batches: one huge transaction would hold every page.
_FREE_BATCH = 10_000


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

    # -- bytes ------------------------------------------------------------------------------

    def put_many(self, items: Iterable[tuple[bytes, bytes | memoryview]]) -> int:
        """Store fragments (hash, bytes) not yet present, in one transaction of their own;
        returns the payload bytes that were new. Refcounts are separate: a fragment is
        stored before any version names it, so a crash leaves an unreferenced fragment
        (gc frees it), never a version with missing data."""
        new = 0
        with self._store.write() as txn:
            for h, data in items:
                # overwrite=False makes the presence check and the insert one descent.
                if txn.put(h, data, db=self._data, overwrite=False):
                    new += len(data)
        return new

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

    def verify(self, txn: lmdb.Transaction, h: bytes) -> str | None:
        """What is wrong with a stored fragment (one line naming it), or None."""
        try:
            self.get(txn, h)
        except CorruptionError as e:
            return str(e)
        return None

    def stored_bytes(self, txn: lmdb.Transaction, h: bytes) -> int:
        """The bytes a fragment takes in the store (0 if absent): what freeing it gives."""
        raw = txn.get(h, db=self._data)
        return len(raw) if raw is not None else 0

    def iterate(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, int]]:
        """(hash, stored bytes) of every stored fragment, in hash order."""
        with txn.cursor(db=self._data) as cur:
            for h, raw in cur:
                yield bytes(h), len(raw)

    def count(self, txn: lmdb.Transaction) -> int:
        """How many fragments are stored (no scan)."""
        return int(txn.stat(self._data)["entries"])

    def free(self, txn: lmdb.Transaction, hashes: Iterable[bytes]) -> int:
        """Delete fragments (their refcounts are the caller's); returns stored bytes freed."""
        freed = 0
        for h in hashes:
            freed += self.stored_bytes(txn, h)
            txn.delete(h, db=self._data)
        return freed

    def free_unreferenced(self, keep: Set[bytes] = frozenset()) -> tuple[int, int]:
        """Free fragments with no reference count (never taken by a version, say a crashed
        import's, or dropped to zero), except those in `keep` (a version not stored yet
        relies on them); in batches of transactions. Returns (fragments, stored bytes)."""
        count = freed = 0
        last: bytes | None = None
        while True:
            batch = []
            with self._store.read() as txn, txn.cursor(db=self._data) as cur:
                ok = cur.set_range(last) if last is not None else cur.first()
                while ok and len(batch) < _FREE_BATCH:
                    h = bytes(cur.key())
                    if h != last and h not in keep and txn.get(h, db=self._refs) is None:
                        batch.append(h)
                    last = h
                    ok = cur.next()
                done = not ok
            if batch:
                with self._store.write() as txn:
                    # Re-checked in the write transaction: a version may have taken it since.
                    gone = [h for h in batch if txn.get(h, db=self._refs) is None
                            and self.has(txn, h)]
                    freed += self.free(txn, gone)
                    count += len(gone)
            if done:
                return count, freed

    # -- reference counts -------------------------------------------------------------------

    def refcount(self, txn: lmdb.Transaction, h: bytes) -> int:
        """How many stored version positions use the fragment."""
        raw = txn.get(h, db=self._refs)
        return _COUNT.unpack(raw)[0] if raw is not None else 0

    def refcounts(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, int]]:
        """(hash, refcount) of every fragment that has one; a damaged count reads as -1."""
        with txn.cursor(db=self._refs) as cur:
            for h, raw in cur:
                yield bytes(h), _COUNT.unpack(raw)[0] if len(raw) == _COUNT.size else -1

    def set_refcount(self, txn: lmdb.Transaction, h: bytes, n: int) -> None:
        """Set a refcount outright (repair); 0 removes it."""
        if n > 0:
            txn.put(h, _COUNT.pack(n), db=self._refs)
        else:
            txn.delete(h, db=self._refs)

    def add_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int]) -> None:
        """Add occurrences (a new version was stored)."""
        for h, n in counts.items():
            txn.put(h, _COUNT.pack(self.refcount(txn, h) + n), db=self._refs)

    def drop_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int],
                  keep: Set[bytes] = frozenset()) -> int:
        """Remove occurrences; free fragments nothing uses (except those in `keep`, which
        a version not stored yet relies on). Returns stored bytes freed."""
        gone = []
        for h, n in counts.items():
            left = self.refcount(txn, h) - n
            if left > 0:
                txn.put(h, _COUNT.pack(left), db=self._refs)
                continue
            txn.delete(h, db=self._refs)
            if h not in keep:
                gone.append(h)
        return self.free(txn, gone)
