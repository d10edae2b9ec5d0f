"""Fragments: each distinct chunk stored once under its BLAKE3 hash, checked on every read.

This module is the only reader and writer of fragment bytes and of their reference
counts: gc, fsck, repair, upgrade, import, the mount's reads and writes all go through
`FragmentStore`, so how fragments are laid out is decided here alone. Sizes it reports
are *stored* bytes (what freeing gives back, once gc compacts the pack).

Layout (store format 5): each fragment is compressed on its own with zstd (level 3:
measured on /usr/include and Python's library in 16 KiB chunks, 26.2% of the bytes at
62 MB/s against 27.2% at 81 MB/s for level 1 and 24.8% at 26 MB/s for level 5, and
borg's `zstd,3` is what users compare with), kept raw when that does not make it
smaller, and appended to a pack file (store.packs). The `fragindex` database maps the
hash to (pack, offset, stored length, length, codec, refcount): one record per fragment,
the reference count beside where its bytes are (format 4 kept the count in `fragrefs`,
a second B-tree keyed by the same 32-byte hashes: 0.32 MB of a 1.87 MB compacted LMDB
file after five sqlalchemy releases; `merge_refs_batch` converts). The hash is of the
uncompressed bytes and is checked on every read: CorruptionError (EIO through the mount), never
wrong bytes. Format 3 kept fragments as LMDB values in `fragments`; `upgrade_batch`
moves them into packs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path

import blake3
import lmdb
import zstandard

from annofs.content import workers
from annofs.errors import CorruptionError, NotBuiltError
from annofs.store import Store, packs
from annofs.store.env import meta_txnid, read_synced_meta
from annofs.store.packs import (
    DOOMED,
    HEADER,
    SEALED,
    PackFiles,
    PackRecord,
    PackWriter,
    all_packs,
    get_pack,
    leftover_files,
    oldest_reader,
    pack_key,
    packs_dir,
    read_records,
)

try:
    from annofs.content._hashcheck import VERIFY_IOV, first_mismatch
except ImportError as e:  # a clone used without installing: say what to run
    raise NotBuiltError(f"annofs.content._hashcheck is not built ({e}): run "
                        "scripts/setup.sh, or pip install -e . in the clone") from e

log = logging.getLogger("annofs.fragments")

# The check of fragments that pyfuse3's checked replies run before writing them
# (pyfuse3.annofs_set_reply_checker): a capsule of the C function, the same BLAKE3 code.
REPLY_CHECK = VERIFY_IOV

_COUNT = struct.Struct(">Q")
# gc rewrites a sealed pack once less than this fraction of it is still pointed at.
COMPACT_BELOW = 0.5
_INDEX = struct.Struct(">QQIIBQ")  # pack, offset, stored length, length, codec, refcount
_INDEX4 = struct.Struct(">QQIIB")  # format 4: the same without the refcount (in fragrefs)
_REFS_AT = _INDEX.size - _COUNT.size
RAW, ZSTD = 0, 1
ZSTD_LEVEL = 3
_MAX_FRAGMENT = 1 << 30  # the largest max_size the chunker accepts (chunker.params)
# Below this a zstd frame's own overhead (and the call) is not worth it.
_MIN_COMPRESS = 64
# A fragment on its way into a pack: hash, stored bytes (a caller's view for a raw one:
# written from it straight into the pack), stored length, length, codec.
_Record = tuple[bytes, bytes | memoryview, int, int, int]
# A fragment as read from its pack, not yet checked: hash, stored bytes, length, codec.
Stored = tuple[bytes, bytes | memoryview, int, int]
# The decompressed bytes of a run of compressed fragments (zstandard's buffer of segments).
Decompressed = Sequence[bytes | memoryview] | zstandard.BufferWithSegmentsCollection
# get_many reads a run of fragments lying back to back in a pack with one pread up to this.
_RUN_BYTES = 4 << 20
# Unreferenced fragments are freed in batches: one huge transaction would hold every page.
_FREE_BATCH = 10_000


def fragment_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte BLAKE3 hash that names a fragment."""
    return blake3.blake3(data).digest()


def _check_all(datas: Sequence[bytes | memoryview], hashes: Sequence[bytes]) -> None:
    """CorruptionError naming the first of `datas` whose BLAKE3 hash is not its hash in
    `hashes`: one call, without the GIL."""
    bad = first_mismatch(datas, hashes)
    if bad >= 0:
        raise CorruptionError(f"fragment {hashes[bad].hex()}: content does not match its hash")


class _Shared:
    """What every FragmentStore of one open Store shares: the pack this process appends
    to, the read descriptors, and per-thread zstd contexts (not thread-safe)."""

    def __init__(self, store: Store) -> None:
        db = store.db["packs"]
        self.files = PackFiles(store.path, store.env, db)
        self.writer = PackWriter(store.path, db)
        self.lock = threading.Lock()  # one append + commit at a time in this process
        self.local = threading.local()
        # (commits counted when the seal committed, the sealed pack): old names to drop.
        self.sealed: list[tuple[int, PackRecord]] = []
        self.sealed_lock = threading.Lock()  # syncs run in other threads
        store.on_close.append(self.close)
        store.after_sync.append(self.synced)

    def synced(self, commits: int) -> None:
        """After a sync that made `commits` transactions durable: drop the old names of
        packs whose seal is among them."""
        with self.sealed_lock:
            done = [rec for n, rec in self.sealed if n <= commits]
            self.sealed = [(n, rec) for n, rec in self.sealed if n > commits]
        for rec in done:
            self.writer.unlink_open_name(rec)

    def close(self) -> None:
        with self.lock:
            self.writer.close()
        self.files.close()

    def compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return c

    def decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self.local, "d", None)
        if d is None:
            d = self.local.d = zstandard.ZstdDecompressor()
        return d


_SHARED: weakref.WeakKeyDictionary[Store, _Shared] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def _shared(store: Store) -> _Shared:
    with _SHARED_LOCK:
        s = _SHARED.get(store)
        if s is None:
            s = _SHARED[store] = _Shared(store)
        return s


def encode(data: bytes | memoryview,
           comp: zstandard.ZstdCompressor) -> tuple[int, bytes | memoryview]:
    """(codec, stored bytes) of a fragment: zstd if that is smaller, else the bytes
    themselves (not copied)."""
    if len(data) >= _MIN_COMPRESS:
        z = comp.compress(data)
        if len(z) < len(data):
            return ZSTD, z
    return RAW, data


class FragmentStore:
    """Fragment payloads and their reference counts: how many stored versions' edits added
    each (see versions.own_counts)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._index = store.db["fragindex"]
        self._packs = store.db["packs"]
        self._refs = store.db["fragrefs"]  # format 4's counts, until upgraded
        self._widen_from: bytes | None = None  # merge_refs_batch's place in the index
        self._legacy = store.db["fragments"]  # format 3's values, until upgraded
        self._s = _shared(store)

    # -- bytes ------------------------------------------------------------------------------

    def put_many(self, items: Iterable[tuple[bytes, bytes | memoryview]]) -> int:
        """Store fragments (hash, bytes) not yet present; returns the payload bytes that
        were new. They are appended to this process's pack, then indexed in one
        transaction, with refcount 0: a fragment is stored before any version names it, so
        a crash leaves an unreferenced fragment (gc frees it), never a version with
        missing data. The bytes may be views into a caller's buffer: they are copied (or
        compressed) before this returns."""
        pending: dict[bytes, bytes | memoryview] = {}
        with self._store.read() as txn:
            for h, data in items:
                if h not in pending and txn.get(h, db=self._index) is None:
                    pending[h] = data
        if not pending:
            return 0
        # Compressed outside any lock or transaction: other threads and writers go on; in
        # runs on the caller and the pool's threads at once, kept in order (content.workers).
        todo = list(pending.items())
        del pending
        records = workers.map_runs(self._encode_run, todo, [len(d) for _h, d in todo])
        del todo
        new = 0
        with self._s.lock:
            i = 0
            while i < len(records):
                j = self._fill(records, i)
                new += self._append(records[i:j])
                i = j
        return new

    def _encode_run(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> list[_Record]:
        """`encode` of each fragment (inlined: this is the hot loop of an import)."""
        compress = self._s.compressor().compress  # one per thread: not thread-safe
        out: list[_Record] = []
        append = out.append
        for h, data in items:
            n = len(data)
            if n >= _MIN_COMPRESS:
                z = compress(data)
                if len(z) < n:
                    append((h, z, len(z), n, ZSTD))
                    continue
            append((h, data, n, n, RAW))
        return out

    def _fill(self, records: list[_Record], i: int) -> int:
        """The end of the run of records from `i` that fits in the pack's room (at least
        one): a pack is sealed near its target size, however large the batch."""
        w = self._s.writer
        room = packs.PACK_TARGET - (w.rec.end if w.rec is not None else 0)
        j, size = i, 0
        while j < len(records) and (j == i or size + HEADER.size + records[j][2] <= room):
            size += HEADER.size + records[j][2]
            j += 1
        return j

    def _append(self, records: list[_Record],
                moving: tuple[int, Mapping[bytes, int]] | None = None) -> int:
        """Append records to this process's pack and index them; seal it if full.

        With `moving` (a pack id, and each record's offset there), the records are moved
        out of that pack by compaction: each index entry is switched to the copy only if it
        still points at the old place (gc may have freed it meanwhile), and the old pack's
        live bytes go down by what moved, in the same transaction."""
        w = self._s.writer
        if w.needs_pack:
            with self._store.write() as txn:
                w.ensure(txn, self._store.next_id(txn, "pack"))
        parts: list[bytes | memoryview] = []
        for h, stored, n, _length, codec in records:
            parts += (HEADER.pack(h, codec, n), stored)
        # Past the recorded end until the transaction below commits: a crash here leaves
        # bytes the next writer of this pack cuts off.
        base = w.append(parts)
        end = base + sum(HEADER.size + r[2] for r in records)
        del parts
        new = 0
        sealed: PackRecord | None = None
        with self._store.write() as txn:
            assert w.rec is not None
            pack, live, at = w.rec.id, 0, base
            for h, _stored, n, length, codec in records:
                size = HEADER.size + n
                if moving is None:
                    # Another process may have stored it meanwhile: ours is dead bytes.
                    entry = _INDEX.pack(pack, at + HEADER.size, n, length, codec, 0)
                    if txn.put(h, entry, db=self._index, overwrite=False):
                        new += length
                        live += size
                elif (refs := self._points_at(txn, h, moving[0], moving[1][h])) is not None:
                    txn.put(h, _INDEX.pack(pack, at + HEADER.size, n, length, codec, refs),
                            db=self._index)
                    new += size
                    live += size
                at += size
            w.record(txn, end, live)
            if moving is not None:
                self._add_live(txn, moving[0], -new)
            if w.full:
                sealed = w.seal(txn)
        if sealed is not None:
            # Its old name goes once a sync made the seal durable (store.packs).
            with self._s.sealed_lock:
                self._s.sealed.append((self._store.commits, sealed))
        return new

    def _points_at(self, txn: lmdb.Transaction, h: bytes, pack: int,
                   offset: int) -> int | None:
        """The fragment's refcount if its index entry points at (pack, offset), else None."""
        raw = self._record(txn, h)
        if raw is None:
            return None
        entry = _INDEX.unpack(raw)
        return entry[5] if entry[:2] == (pack, offset) else None

    def _add_live(self, txn: lmdb.Transaction, pack: int, delta: int) -> None:
        rec = get_pack(txn, self._packs, pack)
        if rec is not None and rec.state != DOOMED:
            txn.put(pack_key(pack), PackRecord(rec.id, rec.state, rec.end,
                                               max(0, rec.live + delta), rec.hash).encode(),
                    db=self._packs)

    def _record(self, txn: lmdb.Transaction, h: bytes) -> bytes | None:
        """The fragment's index record of this format, or None (not stored, or a damaged
        or not yet converted record: nothing to read a count or a place from)."""
        raw = txn.get(h, db=self._index)
        return raw if raw is not None and len(raw) == _INDEX.size else None

    def has(self, txn: lmdb.Transaction, h: bytes) -> bool:
        """Whether a fragment is stored."""
        return txn.get(h, db=self._index) is not None

    def _entry(self, txn: lmdb.Transaction, h: bytes) -> tuple[int, int, int, int, int]:
        raw = txn.get(h, db=self._index)
        if raw is None:
            raise CorruptionError(f"fragment {h.hex()}: missing from the store")
        entry = _INDEX.unpack(raw) if len(raw) == _INDEX.size else None
        # A damaged length must not become an unbounded read or allocation.
        if entry is None or entry[2] > _MAX_FRAGMENT or entry[3] > _MAX_FRAGMENT:
            raise CorruptionError(f"fragment {h.hex()}: damaged index record")
        return entry[:5]

    def get(self, txn: lmdb.Transaction, h: bytes) -> bytes:
        """A fragment's bytes, checked against its hash: CorruptionError, never wrong bytes."""
        pack, offset, n, length, codec = self._entry(txn, h)
        try:
            stored = self._s.files.pread(txn, pack, offset, n)
        except CorruptionError as e:
            raise CorruptionError(f"fragment {h.hex()}: {e}") from None
        return self._checked(h, stored, length, codec)  # type: ignore[return-value]

    def get_many(self, txn: lmdb.Transaction, hashes: Sequence[bytes], *,
                 nowait: bool = False) -> list[bytes | memoryview]:
        """Fragments' bytes in order, each checked against its hash as `get` does
        (`get_many_unverified`, then all are hashed in one call without the GIL:
        `_hashcheck`)."""
        out = self.get_many_unverified(txn, hashes, nowait=nowait)
        _check_all(out, hashes)  # one item per hash, in order
        return out

    def get_many_unverified(self, txn: lmdb.Transaction, hashes: Sequence[bytes], *,
                            nowait: bool = False) -> list[bytes | memoryview]:
        """Fragments' bytes in order, decompressed, NOT yet checked against their hashes:
        for `get_many`, and for the mount's checked replies, which pyfuse3 checks before
        it writes a byte of them (`versions.Unverified`). Damage other than to the bytes
        (a missing fragment, a bad record, a frame that does not decompress to its
        length) is CorruptionError here already.

        A file's fragments were appended to a pack one after another, so a run of them
        that lies back to back in one pack (up to _RUN_BYTES) is read with one pread and
        sliced without a copy: a 1 MiB read of a large file is one system call, not 64.
        This is the mount's read loop (~64 fragments per 1 MiB request): names are bound
        to locals, and a raw fragment is taken without the calls `_checked` costs (the
        hashes are checked after, all in one call). Hence its own loop beside
        `check_decompressed`'s: `check_stored(fetch_stored(...))` gives the same bytes and
        errors but cost 39.8 us against 23.4 for one compressed fragment and 1,723 against
        1,568 us for 64 (zstd's batch call and its buffers). With `nowait`, NotCached
        where a pack's bytes are not in the page cache.
        """
        out: list[bytes | memoryview] = []
        append = out.append
        decompress, frame_size = self._s.decompressor().decompress, zstandard.frame_content_size
        for h, data, length, codec in self.fetch_stored(txn, hashes, nowait=nowait):
            if codec == ZSTD and frame_size(data) == length:
                # _checked's zstd case inlined (a source tree's fragments are mostly
                # compressed); a damaged frame goes through _checked for its error.
                try:
                    data = decompress(data)
                except zstandard.ZstdError:
                    data = self._checked(h, data, length, codec)  # raises, naming it
            elif codec != RAW or len(data) != length:
                data = self._checked(h, data, length, codec)
            append(data)
        return out

    def fetch_stored(self, txn: lmdb.Transaction, hashes: Sequence[bytes], *,
                     nowait: bool = False) -> list[Stored]:
        """(hash, stored bytes, length, codec) of fragments in order, read as `get_many`
        reads them (back-to-back runs with one pread) but not yet checked: `check_stored`
        checks them, in any thread (it needs no transaction). Missing fragments and
        damaged index records or packs are CorruptionError here already. With `nowait`,
        NotCached where a pack's bytes are not in the page cache."""
        get, index, unpack, size = txn.get, self._index, _INDEX.unpack, _INDEX.size
        entries = []
        for h in hashes:
            raw = get(h, db=index)
            if raw is None or len(raw) != size:
                entries.append(self._entry(txn, h))  # raises, naming the fragment
                continue
            e = unpack(raw)
            if e[2] > _MAX_FRAGMENT or e[3] > _MAX_FRAGMENT:
                self._entry(txn, h)  # raises: a damaged length
            entries.append(e)
        out: list[Stored] = []
        append = out.append
        count = len(entries)
        i = 0
        while i < count:
            pack, start, n = entries[i][:3]
            end, j = start + n, i + 1
            while j < count and end - start < _RUN_BYTES:
                p, o, m = entries[j][:3]
                if p != pack or o != end + HEADER.size:
                    break
                end, j = o + m, j + 1
            try:
                run = memoryview(self._s.files.pread(txn, pack, start, end - start,
                                                     nowait=nowait))
            except CorruptionError:
                # Past a pack's end: read them one at a time, so the error names one.
                for k in range(i, j):
                    self.get(txn, hashes[k])
                raise  # (not reached: one of them is past the end)
            for k in range(i, j):
                _p, o, m, length, codec = entries[k][:5]
                append((hashes[k], run[o - start:o - start + m] if j > i + 1 else run,
                        length, codec))
            i = j
        return out

    def check_stored(self, items: Sequence[Stored]) -> list[bytes | memoryview]:
        """The bytes of fragments `fetch_stored` read, each decompressed and checked
        against its hash (CorruptionError, never wrong bytes). Safe in any thread: it
        needs no transaction."""
        return self.check_decompressed(items, self.decompress_stored(items))

    def decompress_stored(self, items: Sequence[Stored]) -> Decompressed:
        """The compressed ones of `items`, decompressed in one call of zstandard's
        (measured: 0.55x the time of a call per fragment, for 7 KB fragments) that holds
        no GIL, so another thread goes on meanwhile; not checked yet: only for
        `check_decompressed`. Safe in any thread."""
        frame_size = zstandard.frame_content_size
        frames: list[bytes | memoryview] = []
        sizes: list[int] = []
        for h, data, length, codec in items:
            if codec == ZSTD:
                if frame_size(data) != length:  # never trust a frame's size for memory
                    self._checked(h, data, length, codec)  # raises, naming it
                frames.append(data)
                sizes.append(length)
        if not frames:
            return []
        try:
            return self._s.decompressor().multi_decompress_to_buffer(
                frames, decompressed_sizes=struct.pack(f"={len(sizes)}Q", *sizes), threads=1)
        except zstandard.ZstdError:
            # A damaged frame: one at a time, so the error names its fragment.
            for h, data, length, codec in items:
                self._checked(h, data, length, codec)
            raise  # (not reached)

    def check_decompressed(self, items: Sequence[Stored],
                           done: Decompressed) -> list[bytes | memoryview]:
        """The bytes of `items`, the compressed ones from `decompress_stored(items)`,
        each checked against its hash: CorruptionError, never wrong bytes."""
        out: list[bytes | memoryview] = []
        append = out.append
        k = 0
        for h, data, length, codec in items:
            if codec == ZSTD:
                data = done[k]
                k += 1
            elif codec != RAW or len(data) != length:
                data = self._checked(h, data, length, codec)
            append(data)
        _check_all(out, [item[0] for item in items])
        return out

    def _checked(self, h: bytes, stored: bytes | memoryview, length: int,
                 codec: int) -> bytes | memoryview:
        """A fragment's bytes from what is stored, checked against its hash."""
        if codec == RAW:
            data = stored
        elif codec == ZSTD:
            # The frame's own size field could be damaged: never trust it for memory.
            if zstandard.frame_content_size(stored) != length:
                raise CorruptionError(f"fragment {h.hex()}: content does not match its hash")
            try:
                data = self._s.decompressor().decompress(stored)
            except zstandard.ZstdError:
                raise CorruptionError(
                    f"fragment {h.hex()}: content does not match its hash") from None
        else:
            raise CorruptionError(f"fragment {h.hex()}: unknown codec {codec}")
        if blake3.blake3(data).digest() != h:
            raise CorruptionError(f"fragment {h.hex()}: content does not match its hash")
        return data

    def verify(self, txn: lmdb.Transaction, h: bytes) -> str | None:
        """What is wrong with a stored fragment (one line naming it), or None."""
        try:
            self.get(txn, h)
        except CorruptionError as e:
            return str(e)
        return None

    def stored_bytes(self, txn: lmdb.Transaction, h: bytes) -> int:
        """The bytes a fragment takes in the store (0 if absent): what freeing it gives."""
        raw = self._record(txn, h)
        return _INDEX.unpack(raw)[2] if raw is not None else 0

    def locate(self, txn: lmdb.Transaction, h: bytes) -> tuple[Path, int, int]:
        """(pack file, offset, stored length) of a fragment: where its bytes are on disk."""
        pack, offset, n, _length, _codec = self._entry(txn, h)
        rec = get_pack(txn, self._packs, pack)
        if rec is None:
            raise CorruptionError(f"fragment {h.hex()}: pack {pack} not in the store")
        return packs_dir(self._store.path) / rec.name, offset, n

    def iterate(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, int]]:
        """(hash, stored bytes) of every stored fragment, in hash order."""
        with txn.cursor(db=self._index) as cur:
            for h, raw in cur:
                yield bytes(h), _INDEX.unpack(raw)[2] if len(raw) == _INDEX.size else 0

    def totals(self, txn: lmdb.Transaction) -> tuple[int, int, int]:
        """(fragments, stored bytes, uncompressed bytes) of every stored fragment."""
        count = stored = length = 0
        with txn.cursor(db=self._index) as cur:
            for raw in cur.iternext(keys=False, values=True):
                if len(raw) == _INDEX.size:
                    _pack, _offset, n, size, _codec, _refs = _INDEX.unpack(raw)
                    count += 1
                    stored += n
                    length += size
        return count, stored, length

    def count(self, txn: lmdb.Transaction) -> int:
        """How many fragments are stored (no scan)."""
        return int(txn.stat(self._index)["entries"])

    def free(self, txn: lmdb.Transaction, hashes: Iterable[bytes]) -> int:
        """Delete fragments (their refcounts are the caller's); returns stored bytes freed.
        Their bytes stay in their packs, counted dead, until gc compacts the pack."""
        freed = 0
        dead: Counter[int] = Counter()
        for h in hashes:
            raw = txn.get(h, db=self._index)
            if raw is None:
                continue
            if len(raw) == _INDEX.size:
                pack, _offset, n, _length, _codec, _refs = _INDEX.unpack(raw)
                freed += n
                dead[pack] += HEADER.size + n
            txn.delete(h, db=self._index)
        for pack, n in dead.items():
            self._add_live(txn, pack, -n)
        return freed

    def free_unreferenced(self, keep: Set[bytes] = frozenset()) -> tuple[int, int]:
        """Free fragments with no reference count (never taken by a version, say a crashed
        import's, or dropped to zero), except those in `keep` (a version not stored yet
        relies on them); in batches of transactions. Returns (fragments, stored bytes)."""
        count = freed = 0
        last: bytes | None = None
        while True:
            batch = []
            with self._store.read() as txn, txn.cursor(db=self._index) as cur:
                ok = cur.set_range(last) if last is not None else cur.first()
                while ok and len(batch) < _FREE_BATCH:
                    h = bytes(cur.key())
                    if h != last and h not in keep and self.refcount(txn, h) == 0:
                        batch.append(h)
                    last = h
                    ok = cur.next()
                done = not ok
            if batch:
                with self._store.write() as txn:
                    # Re-checked in the write transaction: a version may have taken it since.
                    gone = [h for h in batch if self.refcount(txn, h) == 0
                            and self.has(txn, h)]
                    freed += self.free(txn, gone)
                    count += len(gone)
            if done:
                return count, freed

    # -- compaction ---------------------------------------------------------------------------

    def compact(self, below: float = COMPACT_BELOW) -> tuple[int, int]:
        """Rewrite sealed packs whose live fraction is under `below`: their live records
        are appended to this process's pack and the index switched to them, then the old
        pack is doomed, and its file deleted once nothing can read it (drop_doomed: the
        caller syncs first). One pack at a time, so the extra disk is at most one pack's
        live bytes plus doomed packs waiting for old readers. Safe under kill -9: until
        the switch commits the old copy is the indexed one; after it, the new one (made
        durable first by Store.sync). Returns (packs compacted, their file bytes)."""
        with self._store.read() as txn:
            todo = [r for r in all_packs(txn, self._packs)
                    if r.state == SEALED and r.live < below * r.end]
        done = freed = 0
        for rec in todo:
            if self._compact_one(rec):
                done += 1
                freed += rec.end
        return done, freed

    def _compact_one(self, rec: PackRecord) -> bool:
        path = packs_dir(self._store.path) / rec.name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.error("pack %s: file %s missing; not compacted (annofs fsck)", rec.id, rec.name)
            return False
        live: list[_Record] = []
        offsets: dict[bytes, int] = {}
        try:
            with self._store.read() as txn:
                for at, h, codec, stored in read_records(fd, rec.end):
                    if self._points_at(txn, h, rec.id, at) is None:
                        continue  # freed, or a duplicate nobody indexed
                    length = _INDEX.unpack(txn.get(h, db=self._index))[3]
                    live.append((h, stored, len(stored), length, codec))
                    offsets[h] = at
        except CorruptionError as e:
            log.error("pack %s: %s; not compacted (annofs fsck)", rec.id, e)
            return False
        finally:
            os.close(fd)
        with self._s.lock:
            i = 0
            while i < len(live):
                j = self._fill(live, i)
                self._append(live[i:j], (rec.id, offsets))
                i = j
        with self._store.write() as txn:
            cur = get_pack(txn, self._packs, rec.id)
            if cur is None or cur.state != SEALED or cur.live != 0:
                return False  # something new points into it: left for a later gc
            txn.put(pack_key(rec.id), PackRecord(rec.id, DOOMED, cur.end, 0, cur.hash,
                                                 txn.id()).encode(), db=self._packs)
        return True

    def drop_doomed(self) -> int:
        """Delete the files of doomed packs that no snapshot can read any more: the last
        synced state (what a machine crash comes back to) and every reader's are at least
        as new as the doom. Also deletes leftover files no pack record names (a seal or a
        compaction interrupted). Returns the files deleted."""
        synced = read_synced_meta(self._store.path)
        newest_synced = meta_txnid(synced.metas) if synced is not None else 0
        oldest = oldest_reader(self._store.env)
        gone: list[Path] = []
        with self._store.write() as txn:
            for rec in all_packs(txn, self._packs):
                if rec.state == DOOMED and rec.since <= newest_synced and \
                        (oldest is None or rec.since <= oldest):
                    txn.delete(pack_key(rec.id), db=self._packs)
                    self._s.files.forget(rec.id)
                    gone.append(packs_dir(self._store.path) / rec.name)
            # Under the writer lock: no writer is between a rename and its commit.
            gone += leftover_files(self._store.path, txn, self._packs, newest_synced)
        for f in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        return len(gone)

    def reclaimable_pack_bytes(self, txn: lmdb.Transaction) -> int:
        """Pack file bytes gc would give back: the dead bytes of packs it would compact,
        doomed packs, and leftover files (of a seal or compaction that was killed)."""
        total = 0
        for rec in all_packs(txn, self._packs):
            if rec.state == DOOMED:
                total += rec.end
            elif rec.state == SEALED and rec.live < COMPACT_BELOW * rec.end:
                total += rec.end - rec.live
        synced = read_synced_meta(self._store.path)
        newest_synced = meta_txnid(synced.metas) if synced is not None else 0
        for f in leftover_files(self._store.path, txn, self._packs, newest_synced):
            with contextlib.suppress(FileNotFoundError):
                total += f.stat().st_size
        return total

    def check_packs(self, txn: lmdb.Transaction) -> list[str]:
        """Problems of the pack layer: an index entry into a missing pack or past a pack's
        end, a pack whose live bytes are not what the index points at, a missing file."""
        problems = []
        packs = {}
        for rec in all_packs(txn, self._packs):
            packs[rec.id] = rec
            if not (packs_dir(self._store.path) / rec.name).is_file():
                problems.append(f"pack {rec.id}: file {rec.name} missing")
        live: Counter[int] = Counter()
        with txn.cursor(db=self._index) as cur:
            for h, raw in cur:
                if len(raw) != _INDEX.size:
                    problems.append(f"fragment {bytes(h).hex()}: damaged index record")
                    continue
                pack, offset, n, _length, _codec, _refs = _INDEX.unpack(raw)
                rec = packs.get(pack)
                if rec is None or rec.state == DOOMED:
                    problems.append(f"fragment {bytes(h).hex()}: pack {pack} not in the store")
                elif offset + n > rec.end:
                    problems.append(f"fragment {bytes(h).hex()}: past the end of pack {pack}")
                live[pack] += HEADER.size + n
        problems += [f"pack {p}: live bytes {rec.live}, the index points at {live[p]}"
                     for p, rec in packs.items() if rec.state != DOOMED and rec.live != live[p]]
        return problems

    # -- format 3 -------------------------------------------------------------------------

    def legacy_count(self, txn: lmdb.Transaction) -> int:
        """Fragments still kept as LMDB values (a format 3 store not fully upgraded)."""
        return int(txn.stat(self._legacy)["entries"])

    def upgrade_batch(self, limit: int = 32 << 20) -> tuple[int, int]:
        """Move up to `limit` bytes of format 3 fragments into packs: each is checked
        against its hash, stored, and only then deleted from LMDB (a crash in between
        leaves it in both places; the next run deletes it). Returns (fragments, bytes)."""
        items: list[tuple[bytes, bytes]] = []
        size = 0
        with self._store.read() as txn, txn.cursor(db=self._legacy) as cur:
            for h, raw in cur:
                if size >= limit:
                    break
                items.append((bytes(h), bytes(raw)))
                size += len(raw)
        bad = [h for h, data in items if fragment_hash(data) != h]
        if bad:
            raise CorruptionError(f"fragment {bad[0].hex()}: content does not match its hash "
                                  f"(run 'annofs fsck --repair' on a copy, or restore it)")
        self.put_many(items)
        with self._store.write() as txn:
            for h, _data in items:
                txn.delete(h, db=self._legacy)
        return len(items), size

    # -- reference counts -------------------------------------------------------------------

    def refcount(self, txn: lmdb.Transaction, h: bytes) -> int:
        """How many stored version positions use the fragment (0 if it is not stored)."""
        raw = self._record(txn, h)
        return _COUNT.unpack_from(raw, _REFS_AT)[0] if raw is not None else 0

    def refcounts(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, int]]:
        """(hash, refcount) of every stored fragment whose count is not 0 (a damaged index
        record has none: check_packs reports it)."""
        with txn.cursor(db=self._index) as cur:
            for h, raw in cur:
                if len(raw) == _INDEX.size and (n := _COUNT.unpack_from(raw, _REFS_AT)[0]):
                    yield bytes(h), n

    def set_refcount(self, txn: lmdb.Transaction, h: bytes, n: int) -> bool:
        """Set a refcount outright (repair); False if the fragment is not stored (or its
        index record is damaged), which has no count to set."""
        raw = self._record(txn, h)
        if raw is None:
            return False
        txn.put(h, _with_refs(raw, n), db=self._index)
        return True

    def add_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int]) -> None:
        """Add occurrences (a new version was stored). Its fragments are stored first, so
        one that is not is an error (CorruptionError: the version is not stored)."""
        for h, n in counts.items():
            raw = self._record(txn, h)
            if raw is None:
                raise CorruptionError(f"fragment {h.hex()}: missing from the store")
            txn.put(h, _with_refs(raw, _COUNT.unpack_from(raw, _REFS_AT)[0] + n),
                    db=self._index)

    def drop_refs(self, txn: lmdb.Transaction, counts: Mapping[bytes, int],
                  keep: Set[bytes] = frozenset()) -> int:
        """Remove occurrences; free fragments nothing uses (except those in `keep`, which
        a version not stored yet relies on). Returns stored bytes freed."""
        gone = []
        for h, n in counts.items():
            raw = self._record(txn, h)
            if raw is None:
                continue  # nothing stored to count (fsck reports the version)
            left = _COUNT.unpack_from(raw, _REFS_AT)[0] - n
            if left > 0 or h in keep:
                txn.put(h, _with_refs(raw, max(0, left)), db=self._index)
            else:
                gone.append(h)
        return self.free(txn, gone)

    # -- format 4 ---------------------------------------------------------------------------

    def merge_refs_batch(self, limit: int = 20_000) -> int:
        """Convert up to `limit` fragments of format 4 (index record without its count, the
        count in `fragrefs`) to one record each, in one transaction: the count joins the
        record and leaves `fragrefs` together, so an interrupted run loses nothing and the
        next goes on. A count of a fragment not stored (a damaged store) has nothing to
        join and goes. Returns how many records it converted (0: done)."""
        done = 0
        with self._store.write() as txn:
            with txn.cursor(db=self._refs) as cur:
                refs = [(bytes(h), bytes(raw)) for h, raw in
                        (item for _, item in zip(range(limit), cur, strict=False))]
            for h, raw in refs:
                n = _COUNT.unpack(raw)[0] if len(raw) == _COUNT.size else 0
                entry = txn.get(h, db=self._index)
                if entry is not None and len(entry) in (_INDEX4.size, _INDEX.size):
                    txn.put(h, _INDEX.pack(*_INDEX4.unpack_from(entry), n), db=self._index)
                txn.delete(h, db=self._refs)
                done += 1
            if done:
                return done
            # Then the fragments nothing counted: their records widened with a 0 (in hash
            # order, from where the last batch stopped: no rescanning what is done).
            old: list[tuple[bytes, bytes]] = []
            with txn.cursor(db=self._index) as cur:
                ok = cur.set_range(self._widen_from) if self._widen_from else cur.first()
                while ok and len(old) < limit:
                    if len(cur.value()) == _INDEX4.size:
                        old.append((bytes(cur.key()), bytes(cur.value())))
                    ok = cur.next()
            for h, raw in old:
                txn.put(h, _INDEX.pack(*_INDEX4.unpack(raw), 0), db=self._index)
            if old:
                self._widen_from = old[-1][0]
            return len(old)


def _with_refs(raw: bytes | memoryview, n: int) -> bytes:
    """An index record with its refcount set to `n`."""
    return bytes(raw[:_REFS_AT]) + _COUNT.pack(n)
