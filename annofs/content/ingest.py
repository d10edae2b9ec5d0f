"""Chunk, hash and store a byte stream as a fragment list."""

from __future__ import annotations

import errno
import io
import os
from array import array
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from annofs.content import workers
from annofs.content.fragments import FragmentStore, fragment_hash
from annofs.content.versions import zeros
from annofs.store import Store
from annofs.store.records import HOLE, lengths_array
from chunker import ChunkParams, cut_lengths, fitted_read_size, stream_blocks
from chunker.stream import DEFAULT_READ_SIZE

_b3 = blake3.blake3  # looked up once: the per-fragment loops call it


@dataclass
class Ingested:
    """A stream as stored: its fragment list, size and whole-content digest."""

    hashes: bytes
    lengths: array
    size: int
    digest: bytes
    new_bytes: int  # payload bytes that were not in the store before
    hole_bytes: int = 0  # bytes of holes: never read (a sparse file's)


class FragmentBatch:
    """Fragments of several streams waiting to be stored in one transaction.

    A commit per small file was most of an import's time (one LMDB commit rewrites the
    B-tree pages it touched). The batch keeps views into the chunker's buffers, so its
    owner flushes before a buffer is reused (ingest_stream does) and before anything
    refers to the fragments (a version must never name a fragment not yet stored).
    """

    def __init__(self, store: Store, fragments: FragmentStore, limit: int = 8 << 20) -> None:
        self._store = store
        self._fragments = fragments
        self._limit = limit
        self._items: list[tuple[bytes, bytes | memoryview]] = []
        self._bytes = 0
        self.new_bytes = 0
        """Payload bytes stored by this batch's flushes that were not in the store before."""

    def add(self, h: bytes, data: bytes | memoryview) -> None:
        """Queue one fragment."""
        self._items.append((h, data))
        self._bytes += len(data)

    def extend(self, items: list[tuple[bytes, bytes | memoryview]], nbytes: int) -> None:
        """Queue fragments whose lengths add up to `nbytes`."""
        self._items += items
        self._bytes += nbytes

    @property
    def full(self) -> bool:
        """Whether the queued bytes reached the limit."""
        return self._bytes >= self._limit

    def flush(self) -> None:
        """Store what is queued, in one transaction."""
        if self._items:
            self.new_bytes += self._fragments.put_many(self._items)
            self._items = []
            self._bytes = 0


def _read_size(stream: BinaryIO) -> int:
    """A buffer fitted to a regular file's or a seekable stream's size (most source files
    are a few KiB: a 4 MiB buffer, zero-filled, would cost more than chunking them)."""
    try:
        return fitted_read_size(stream)  # type: ignore[arg-type]
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        if stream.seekable():
            pos = stream.tell()
            end = stream.seek(0, io.SEEK_END)
            stream.seek(pos)
            return max(1, min(DEFAULT_READ_SIZE, end - pos))
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    return DEFAULT_READ_SIZE


def ingest_stream(store: Store, fragments: FragmentStore, stream: BinaryIO,
                  params: ChunkParams, batch: FragmentBatch | None = None,
                  read_size: int | None = None,
                  whole: blake3.blake3 | None = None) -> Ingested:
    """Read a stream to its end, storing each distinct fragment once.

    `read_size` sizes the chunker's buffer; by default it is fitted to a regular file's
    size. A stream that knows its length but has no file descriptor (a file inside a
    NAR, used by annofs.transfer.nar) passes it: a zero-filled 4 MiB buffer per small file
    costs more than chunking it.

    Fragments are stored before any version refers to them: a crash in between leaves
    unreferenced fragments, which gc reclaims, never a version with missing data. Each
    block of the chunker's buffer is stored in one transaction straight from the buffer
    (no copy per chunk), and hashed for the whole-file digest in one call.

    With a shared `batch`, the fragments of a stream that fits in one block stay queued
    (the caller flushes before using the result) and `new_bytes` is counted on the batch,
    not on the result (0 there). With `whole`, the bytes are hashed into it (a part of a
    larger content) and the result's digest is not meaningful.
    """
    own = batch is None
    queue = FragmentBatch(store, fragments) if batch is None else batch
    shared_hash = whole is not None
    if whole is None:
        whole = blake3.blake3()
    hashes = bytearray()
    lengths = array("I")
    first = True
    buf_size = max(1, read_size) if read_size is not None else _read_size(stream)
    for block, cuts, last in stream_blocks(stream, params, buf_size):
        hashing: Future[None] | None = None
        later = False  # a large block is hashed whole in a pool thread meanwhile
        if shared_hash or not (first and last and len(cuts) == 1):
            # A one-fragment file's digest is its fragment's hash: no second pass.
            later = len(block) >= workers.MIN_SPLIT_BYTES
            if later:
                hashing = workers.submit(whole.update, block)
            else:
                whole.update(block)
        whole_block = block
        first = False
        if not own and last:
            # Queued past this call: a copy the exact size of the data, not a view that
            # would keep the chunker's whole (zero-filled, max_size larger) buffer alive.
            block = memoryview(bytes(block))
        start = 0
        items = []
        for n in cuts:  # the hot loop: a fragment's hash (fragment_hash) inlined
            piece = block[start : start + n]
            h = _b3(piece).digest()
            hashes += h
            items.append((h, piece))
            start += n
        lengths.extend(cuts)
        queue.extend(items, start)
        # The block is a view of a buffer the next pass overwrites: store it first.
        if own or not last or queue.full:
            queue.flush()
        if later:  # done before the chunker overwrites the block
            workers.finish(hashing, whole.update, whole_block)
    size = sum(lengths)
    digest = bytes(hashes) if len(lengths) == 1 else whole.digest()
    return Ingested(bytes(hashes), lengths, size, digest, queue.new_bytes if own else 0)


def ingest_bytes(data: bytes, params: ChunkParams, batch: FragmentBatch) -> Ingested:
    """Chunk and hash content already in memory, queueing its fragments on `batch` (views of
    `data`, no copy); the caller flushes before using the result."""
    n = len(data)
    if 0 < n <= params.min_size:
        # No cut can fall inside (most files of a source tree): one fragment, whose hash is
        # the digest, without the chunker's call or a loop (a tenth of a reader's time).
        h = _b3(data).digest()
        batch.add(h, data)
        return Ingested(h, array("I", (n,)), n, h, 0)
    view = memoryview(data)
    hashes = bytearray()
    lengths = array("I", cut_lengths(view, params))
    start = 0
    for n in lengths:
        piece = view[start : start + n]
        h = fragment_hash(piece)
        hashes += h
        batch.add(h, piece)
        start += n
    # A one-fragment file's digest is its fragment's hash: no second pass.
    digest = bytes(hashes) if len(lengths) == 1 else blake3.blake3(view).digest()
    return Ingested(bytes(hashes), lengths, len(data), digest, 0)


class _Window:
    """readinto over [start, start+n) of a file descriptor (one run of a sparse file)."""

    def __init__(self, fd: int, start: int, n: int) -> None:
        self._fd, self._pos, self._left = fd, start, n

    def readinto(self, buf: memoryview) -> int:
        k = min(len(buf), self._left)
        if k <= 0:
            return 0
        got = os.preadv(self._fd, [buf[:k]], self._pos)
        self._pos += got
        self._left -= got if got else self._left  # EOF early: the file shrank
        return got


def data_runs(fd: int, size: int, hole_min: int) -> list[tuple[int, int]] | None:
    """The file's data as [start, end) runs separated by host holes of at least
    `hole_min` bytes (SEEK_DATA/SEEK_HOLE; shorter holes are read as data), or None if
    the host cannot tell."""
    segments: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            segments.append((start, end))
            pos = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    runs: list[tuple[int, int]] = []
    for a, b in segments:
        gap_start = runs[-1][1] if runs else 0
        if a - gap_start < hole_min:
            runs[-1:] = [(runs[-1][0] if runs else 0, b)]
        else:
            runs.append((a, b))
    tail_start = runs[-1][1] if runs else 0
    if size - tail_start < hole_min and size > tail_start:
        runs[-1:] = [(runs[-1][0] if runs else 0, size)]
    return runs


def ingest_sparse(store: Store, fragments: FragmentStore, fd: int, size: int,
                  params: ChunkParams, batch: FragmentBatch, hole_min: int,
                  hole_limit: int) -> Ingested | None:
    """Store a sparse host file without reading its holes: each data run is chunked as
    a file of its own and holes of at least `hole_min` become hole entries, the list
    rewrite() gives. None if the host does not report holes (read it as a stream).

    The digest hashes the holes' zeros too (no shortcut exists for BLAKE3), unless they
    pass `hole_limit` bytes: then the version has no digest (too large to hash).
    """
    runs = data_runs(fd, size, hole_min)
    if runs is None:
        return None
    hashable = size - sum(b - a for a, b in runs) <= hole_limit
    whole = blake3.blake3() if hashable else None
    hashes = bytearray()
    lengths = array("Q")
    new_bytes = 0
    pos = 0

    def hole(n: int) -> None:
        hashes.extend(HOLE)
        lengths.append(n)
        if whole is not None:
            for z in zeros(n):
                whole.update(z)

    shrank = False
    got_sizes: list[int] = []
    for a, b in runs:
        if a > pos:
            hole(a - pos)
        window = _Window(fd, a, b - a)
        got = ingest_stream(store, fragments, window, params, batch,  # type: ignore[arg-type]
                            read_size=min(b - a, 4 << 20) or 1,
                            whole=whole if whole is not None else blake3.blake3())
        batch.flush()  # the chunker's buffer is reused by the next run
        new_bytes += got.new_bytes
        got_sizes.append(got.size)
        hashes.extend(got.hashes)
        lengths.extend(got.lengths.tolist())
        pos = a + got.size
        if got.size != b - a:
            shrank = True  # the file shrank while it was read: what was read is the content
            break
    if pos < size and not shrank:
        hole(size - pos)
    total = sum(lengths)
    digest = whole.digest() if whole is not None else None
    return Ingested(bytes(hashes), lengths_array(bytes(hashes), lengths), total, digest,
                    new_bytes, total - sum(got_sizes))
