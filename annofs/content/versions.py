"""Versions: nodes of the edit graph. Each is readable directly from its fragment list."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, OrderedDict
from collections.abc import Iterator, Set
from itertools import accumulate

import blake3
import lmdb

from annofs.content.fragments import FragmentStore
from annofs.errors import AnnofsError, CorruptionError, NotFoundError
from annofs.store import Store
from annofs.store.keys import HASH_SIZE, u64
from annofs.store.records import (
    HOLE,
    Edit,
    Version,
    decode_version,
    encode_version,
    is_wide_version,
    lengths_array,
)

# The empty file: root of every path's history, created with the store.
EMPTY_VERSION = 0
EMPTY_DIGEST = blake3.blake3(b"").digest()

# The largest file size: the kernel's own for FUSE (s_maxbytes = MAX_LFS_FILESIZE on a
# 64-bit kernel). Lengths are uint64 and a hole costs nothing, so nothing smaller is
# needed; past it, EFBIG.
MAX_FILE_SIZE = (1 << 63) - 1

# Zeros of a hole are produced (read, hashed, dumped) this much at a time, from one
# shared buffer: memory stays flat however long the hole.
ZERO_SLICE = 1 << 20
_ZEROS = bytes(ZERO_SLICE)

# BLAKE3 has no shortcut for zeros (a chunk's chaining value depends on its counter), so
# hashing a hole costs its length (~2.7 GB/s here). A version with more holes than this
# is never hashed: it has no digest, so it cannot be signed, and a policy cannot judge it.
DIGEST_HOLE_LIMIT = 16 << 30


@dataclasses.dataclass(frozen=True, slots=True)
class Unverified:
    """A read's bytes before their check: whole fragments, their hashes (32 bytes each,
    one after another), and the read's place in them: bytes [lo, lo + size) of the
    fragments laid end to end. Nothing may pass these bytes on unchecked: the mount hands
    them to pyfuse3 as a checked reply (`reply`), which hashes every fragment before it
    writes a byte of the reply, and answers EIO where one does not match. Where pyfuse3
    checks inline, it hashes these very buffers and then writes from them: they must be
    the read's own (fresh pack reads and decompressions), never memory anything else can
    change meanwhile (a shared cache, a mapped pack, LMDB's map)."""

    frags: list[bytes | memoryview]
    hashes: bytes
    lo: int
    size: int

    def reply(self) -> tuple[list[bytes | memoryview], bytes, int, int]:
        """The checked reply pyfuse3 takes from Operations.read
        (pyfuse3.annofs_set_reply_checker)."""
        return self.frags, self.hashes, self.lo, self.size


@dataclasses.dataclass(frozen=True, slots=True)
class _Span:
    """The fragments of a version that hold bytes [offset, end): indexes first..last."""

    starts: array
    first: int
    last: int
    end: int
    packed: bytes  # their hashes, 32 bytes each

    @classmethod
    def of(cls, v: Version, offset: int, size: int) -> _Span | None:
        end = min(v.size, offset + size)
        if offset >= end:
            return None
        starts = fragment_starts(v)
        first = bisect_right(starts, offset) - 1
        last = bisect_left(starts, end, first) - 1  # the fragment holding byte end-1
        # One slice of the packed list, cut in Python's C loop (not a call per fragment).
        return cls(starts, first, last, end,
                   v.hashes[first * HASH_SIZE:(last + 1) * HASH_SIZE])

    def hashes(self) -> list[bytes]:
        p = self.packed
        return [p[k:k + HASH_SIZE] for k in range(0, len(p), HASH_SIZE)]


def _check_length(v: Version, h: bytes, frag: bytes | memoryview, length: int) -> None:
    if len(frag) != length:
        raise CorruptionError(f"fragment {h.hex()}: {len(frag)} bytes, the version "
                              f"{v.id} says {length}")


class TooLargeToHashError(AnnofsError):
    """A sparse version whose holes are too long to hash: no digest, no signature."""

    errno = errno.EFBIG


def zeros(n: int) -> Iterator[bytes | memoryview]:
    """`n` zero bytes in slices of at most ZERO_SLICE, without allocating more."""
    view = memoryview(_ZEROS)
    while n > 0:
        k = min(n, ZERO_SLICE)
        yield view[:k] if k < ZERO_SLICE else _ZEROS
        n -= k


_STARTS_CACHE: OrderedDict[tuple[int, int, int, int], array] = OrderedDict()
_STARTS_CACHE_SIZE = 256


def fragment_starts(v: Version) -> array:
    """Cumulative offsets: starts[i] is where fragment i begins; starts[-1] == size.

    Cached for stored versions (immutable): a read of a large file must not redo a
    65k-element prefix sum per 128 KiB request. The key includes the creation time
    because ids are only unique within one store, and a process may open several.
    """
    if v.id < 0:
        return array("Q", accumulate(v.lengths, initial=0))
    key = (v.id, v.created_ns, v.size, v.count)
    starts = _STARTS_CACHE.get(key)
    if starts is not None:
        # Reads run in worker threads too: another may have evicted the key meanwhile.
        with contextlib.suppress(KeyError):
            _STARTS_CACHE.move_to_end(key)
        return starts
    starts = array("Q", accumulate(v.lengths, initial=0))
    _STARTS_CACHE[key] = starts
    if len(_STARTS_CACHE) > _STARTS_CACHE_SIZE:
        _STARTS_CACHE.popitem(last=False)
    return starts


def _count_hashes(hashes: bytes | memoryview) -> Counter[bytes]:
    if len(hashes) == HASH_SIZE:  # most files of a source tree: no generator, no slicing
        return Counter({bytes(hashes): 1}) if hashes != HOLE else Counter()
    counts = Counter(bytes(hashes[i : i + HASH_SIZE]) for i in range(0, len(hashes), HASH_SIZE))
    counts.pop(HOLE, None)  # a hole stores nothing: no fragment to count
    return counts


def stored_hashes(v: Version) -> Iterator[bytes]:
    """The hashes of the version's stored fragments, in order (holes left out)."""
    for i in range(v.count):
        h = v.fragment_hash(i)
        if h != HOLE:
            yield h


def own_counts(v: Version) -> Counter[bytes]:
    """The fragment occurrences a version holds references for: the ones its edit added.

    Everything else in its list it shares with its parent, which stays stored while the
    version does (gc keeps ancestors, or re-parents first). So storing a new version costs
    its edit, not its size: a one-byte change to a 65k-fragment file touches a few counts.
    """
    if v.id == EMPTY_VERSION:
        return Counter()
    if v.edit is None:
        return _count_hashes(v.hashes)
    start, added = v.edit.start * HASH_SIZE, v.edit.added * HASH_SIZE
    return _count_hashes(memoryview(v.hashes)[start : start + added])


_BLOCK = 256  # hashes compared per step: a memcmp of 8 KiB


def _common_run(a: bytes, b: bytes, n: int, *, from_end: bool) -> int:
    """How many leading (or trailing) fragment hashes a and b share, at most n.

    Compared a block of hashes at a time (bytes equality is a memcmp; memoryview
    equality measured 25x slower), then hash by hash inside the first differing block.
    """
    la, lb = len(a), len(b)

    def span(x: bytes, lx: int, i: int, j: int) -> bytes:
        return x[lx - j * HASH_SIZE : lx - i * HASH_SIZE] if from_end else \
            x[i * HASH_SIZE : j * HASH_SIZE]

    k = 0
    while k < n:
        step = min(_BLOCK, n - k)
        if span(a, la, k, k + step) == span(b, lb, k, k + step):
            k += step
            continue
        for j in range(k, k + step):
            if span(a, la, j, j + 1) != span(b, lb, j, j + 1):
                return j
    return k


def compute_edit(parent: Version, hashes: bytes, lengths: array) -> Edit:
    """The replaced fragment range: common prefix and suffix kept, the middle swapped."""
    n_old, n_new = len(parent.lengths), len(lengths)
    if n_old == 0:  # from the empty file (every file of a first import): all added
        return Edit(0, 0, n_new)
    a, b = bytes(parent.hashes), bytes(hashes)
    prefix = _common_run(a, b, min(n_old, n_new), from_end=False)
    suffix = _common_run(a, b, min(n_old, n_new) - prefix, from_end=True)
    return Edit(prefix, n_old - prefix - suffix, n_new - prefix - suffix)


class VersionStore:
    """Create, fetch and read versions."""

    def __init__(self, store: Store, fragments: FragmentStore) -> None:
        self._store = store
        self._db = store.db["versions"]
        self.fragments = fragments
        self._stored: dict[int, int] = {}  # version id -> data bytes, for sparse ones

    def ensure_empty(self, txn: lmdb.Transaction) -> None:
        """Create the empty root version if the store lacks it."""
        if txn.get(u64(EMPTY_VERSION), db=self._db) is None:
            v = Version(EMPTY_VERSION, EMPTY_VERSION, 0, EMPTY_DIGEST, time.time_ns(), None,
                        b"", array("I"))
            txn.put(u64(EMPTY_VERSION), encode_version(v), db=self._db)

    def get(self, txn: lmdb.Transaction, vid: int) -> Version:
        """Fetch a version record."""
        raw = txn.get(u64(vid), db=self._db)
        if raw is None:
            raise NotFoundError(f"version {vid}: no such version")
        return decode_version(vid, raw)

    def stored_size(self, txn: lmdb.Transaction, vid: int, size: int) -> int:
        """Data bytes of a stored version of `size` bytes, holes left out (st_blocks).

        A record without holes says so in its first bytes: no decoding on each getattr.
        A sparse one is decoded once and remembered (versions never change).
        """
        known = self._stored.get(vid)
        if known is not None:
            return known
        raw = txn.get(u64(vid), db=self._db)
        if raw is None or not is_wide_version(raw):
            return size
        stored = decode_version(vid, raw).stored_size
        if len(self._stored) >= 4096:
            self._stored.pop(next(iter(self._stored)))
        self._stored[vid] = stored
        return stored

    def exists(self, txn: lmdb.Transaction, vid: int) -> bool:
        """Whether a version id is stored."""
        return txn.get(u64(vid), db=self._db) is not None

    def create(
        self,
        txn: lmdb.Transaction,
        parent: int | Version,
        hashes: bytes,
        lengths: array,
        digest: bytes | None,
    ) -> Version:
        """Store a new version derived from `parent`; its fragments must already be stored.

        `parent` is an id, or the stored version itself when the caller holds it decoded
        already (records are immutable in what is compared here: hashes and lengths).
        If the content equals the parent's, no node is added and the parent is returned:
        a close without a change is not an edit.
        """
        base = parent if isinstance(parent, Version) else self.get(txn, parent)
        # Same hashes may still differ in a hole's length: compare lengths too (rarely).
        if base.hashes == hashes and base.lengths.tolist() == list(lengths):
            return base
        vid = self._store.next_id(txn, "version")
        lengths = lengths_array(hashes, lengths)
        size = sum(lengths)
        if size == 0:
            digest = EMPTY_DIGEST
        v = Version(vid, base.id, size, digest, time.time_ns(),
                    compute_edit(base, hashes, lengths), hashes, lengths)
        txn.put(u64(vid), encode_version(v), db=self._db)
        if digest is not None:
            txn.put(digest + u64(vid), b"", db=self._store.db["version_digests"])
        self.fragments.add_refs(txn, own_counts(v))
        return v

    def set_digest(self, txn: lmdb.Transaction, v: Version, digest: bytes) -> Version:
        """Record a digest computed after the version was made."""
        nv = dataclasses.replace(v, digest=digest)
        txn.put(u64(v.id), encode_version(nv), db=self._db)
        txn.put(digest + u64(v.id), b"", db=self._store.db["version_digests"])
        return nv

    def delete(self, txn: lmdb.Transaction, v: Version,
               keep: Set[bytes] = frozenset()) -> int:
        """Remove a version record and its fragment references; returns bytes freed.

        Fragments in `keep` stay even when no stored version uses them any more.
        """
        txn.delete(u64(v.id), db=self._db)
        return self.fragments.drop_refs(txn, own_counts(v), keep)

    def reparent(self, txn: lmdb.Transaction, v: Version, parent: Version,
                 keep: Set[bytes] = frozenset()) -> Version:
        """Derive `v` from another ancestor (its parent is going away); references follow
        the new edit (added before the old ones are dropped, so nothing is freed between)."""
        nv = dataclasses.replace(v, parent=parent.id,
                                 edit=compute_edit(parent, v.hashes, v.lengths))
        txn.put(u64(v.id), encode_version(nv), db=self._db)
        self.fragments.add_refs(txn, own_counts(nv))
        self.fragments.drop_refs(txn, own_counts(v), keep)
        return nv

    def iter_ids(self, txn: lmdb.Transaction) -> Iterator[int]:
        """Every stored version id, ascending."""
        with txn.cursor(db=self._db) as cur:
            for key in cur.iternext(keys=True, values=False):
                yield int.from_bytes(key, "big")

    def read(self, txn: lmdb.Transaction, v: Version, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a version, short at EOF. Every fragment is checked.

        In a transaction opened with `buffers=True` the fragments are hashed and sliced in
        LMDB's map, and the one join is the only copy: the result never points into the map.
        """
        parts = self.read_parts(txn, v, offset, size)
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]
        return b"".join(parts)

    def read_parts(self, txn: lmdb.Transaction, v: Version, offset: int,
                   size: int, *, nowait: bool = False) -> list[bytes | memoryview]:
        """`read` as the list of its parts, not joined (the mount sends them to the kernel
        with one writev). The parts never point into LMDB's map. With `nowait`, only from
        the page cache (store.packs.NotCached otherwise)."""
        span = _Span.of(v, offset, size)
        if span is None:
            return []
        hashes = span.hashes()
        # Stored fragments fetched together (back-to-back ones in one pread), each checked.
        holes = v.may_have_holes and HOLE in hashes
        frags = iter(self.fragments.get_many(
            txn, [h for h in hashes if h != HOLE] if holes else hashes, nowait=nowait))
        starts, end = span.starts, span.end
        parts: list[bytes | memoryview] = []
        append = parts.append
        for i, h in enumerate(hashes, span.first):
            a, b = starts[i], starts[i + 1]
            lo = offset - a if offset > a else 0
            hi = (end if end < b else b) - a
            if holes and h == HOLE:
                append(bytes(hi - lo))
                continue
            frag = next(frags)
            _check_length(v, h, frag, b - a)
            append(frag[lo:hi] if lo or hi != b - a else frag)
        return parts

    def read_unverified(self, txn: lmdb.Transaction, v: Version, offset: int, size: int, *,
                        nowait: bool = False, max_frags: int | None = None
                        ) -> Unverified | None:
        """Bytes [offset, offset+size) of `v` as whole fragments NOT yet checked against
        their hashes, for a reply that checks them before it writes a byte
        (`Unverified`). None, before anything is read, where `read_parts` is to serve
        the range instead: it is empty (at or past the end), it has a hole, or it spans
        more than `max_frags` fragments. The lengths are checked here, as `read_parts`
        checks them."""
        span = _Span.of(v, offset, size)
        if span is None or (max_frags is not None and span.last - span.first >= max_frags):
            return None
        hashes = span.hashes()
        if v.may_have_holes and HOLE in hashes:
            return None
        frags = self.fragments.get_many_unverified(txn, hashes, nowait=nowait)
        starts = span.starts
        for i, (h, frag) in enumerate(zip(hashes, frags, strict=True), span.first):
            _check_length(v, h, frag, starts[i + 1] - starts[i])
        return Unverified(frags, span.packed, offset - starts[span.first], span.end - offset)

    def read_snapshot(self, v: Version, offset: int, size: int) -> bytes:
        """`read` in a read transaction of its own, without copying fragments out of the map
        before the join. Safe in a worker thread. `v` must be stored, or be a version whose
        fragments are (a spilled open file's): a fresh snapshot sees only committed data."""
        with self._store.env.begin(buffers=True) as txn:
            return self.read(txn, v, offset, size)

    def read_parts_snapshot(self, v: Version, offset: int, size: int, *,
                            nowait: bool = False) -> list[bytes | memoryview]:
        """`read_parts` in a read transaction of its own (see read_snapshot)."""
        with self._store.env.begin(buffers=True) as txn:
            return self.read_parts(txn, v, offset, size, nowait=nowait)

    def read_unverified_snapshot(self, v: Version, offset: int, size: int, *,
                                 nowait: bool = False, max_frags: int | None = None
                                 ) -> Unverified | None:
        """`read_unverified` in a read transaction of its own (see read_snapshot)."""
        with self._store.env.begin(buffers=True) as txn:
            return self.read_unverified(txn, v, offset, size, nowait=nowait,
                                        max_frags=max_frags)

    def iter_bytes(self, txn: lmdb.Transaction, v: Version) -> Iterator[bytes | memoryview]:
        """The whole content, fragment by fragment, each checked; a hole as zeros in
        slices of at most ZERO_SLICE (streamed, never materialised)."""
        for i in range(v.count):
            h = v.fragment_hash(i)
            if h == HOLE:
                yield from zeros(v.lengths[i])
            else:
                yield self.fragments.get(txn, h)

    def iter_extents(self, txn: lmdb.Transaction, v: Version
                     ) -> Iterator[tuple[int, bytes | int]]:
        """(offset, bytes) for each stored fragment, (offset, length) for each hole: what
        a writer of a sparse copy needs (export seeks over the ints)."""
        pos = 0
        for i in range(v.count):
            h = v.fragment_hash(i)
            n = v.lengths[i]
            yield pos, (n if h == HOLE else self.fragments.get(txn, h))
            pos += n

    def check_hashable(self, v: Version) -> None:
        """TooLargeToHashError if the version's holes are too long to hash."""
        holes = v.size - v.stored_size
        if holes > DIGEST_HOLE_LIMIT:
            raise TooLargeToHashError(
                f"version {v.id}: {v.size} bytes with {holes} bytes of holes is too large to "
                f"hash (at most {DIGEST_HOLE_LIMIT} bytes of holes): it has no digest, so it "
                "cannot be signed, and a policy cannot judge it")

    def compute_digest(self, txn: lmdb.Transaction, v: Version) -> bytes:
        """BLAKE3 of the whole content, from the fragments (checked as they are read) and
        the holes' zeros. TooLargeToHashError past DIGEST_HOLE_LIMIT of holes."""
        self.check_hashable(v)
        h = blake3.blake3()
        for frag in self.iter_bytes(txn, v):
            h.update(frag)
        return h.digest()

    def ensure_digest(self, v: Version) -> Version:
        """The version with its digest, computing and recording it if it was deferred."""
        if v.digest is not None:
            return v
        with self._store.read() as txn:
            digest = self.compute_digest(txn, v)
        with self._store.write() as txn:
            current = self.get(txn, v.id)
            if current.digest is not None:
                return current
            if len(digest) != HASH_SIZE:
                raise CorruptionError(f"version {v.id}: bad digest length")
            return self.set_digest(txn, current, digest)
