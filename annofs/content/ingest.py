"""Chunk, hash and store a byte stream as a fragment list."""

from __future__ import annotations

import io
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from annofs.content.fragments import FragmentStore, fragment_hash
from annofs.store import Store
from chunker import ChunkParams, cut_lengths, fitted_read_size, stream_blocks
from chunker.stream import DEFAULT_READ_SIZE


@dataclass
class Ingested:
    """A stream as stored: its fragment list, size and whole-content digest."""

    hashes: bytes
    lengths: array
    size: int
    digest: bytes
    new_bytes: int  # payload bytes that were not in the store before


def store_fragments(store: Store, fragments: FragmentStore,
                    batch: Iterable[tuple[bytes, bytes | memoryview]]) -> int:
    """Put fragments in one transaction; returns the payload bytes that were new."""
    new = 0
    with store.write() as txn:
        for h, data in batch:
            if fragments.put(txn, h, data):
                new += len(data)
    return new


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

    @property
    def full(self) -> bool:
        """Whether the queued bytes reached the limit."""
        return self._bytes >= self._limit

    def flush(self) -> None:
        """Store what is queued, in one transaction."""
        if self._items:
            self.new_bytes += store_fragments(self._store, self._fragments, self._items)
            self._items = []
            self._bytes = 0


def _read_size(stream: BinaryIO) -> int:
    """A buffer fitted to a regular file's size: most source files are a few KiB."""
    try:
        return fitted_read_size(stream)  # type: ignore[arg-type]
    except (AttributeError, OSError, io.UnsupportedOperation):
        return DEFAULT_READ_SIZE


def ingest_stream(store: Store, fragments: FragmentStore, stream: BinaryIO,
                  params: ChunkParams, batch: FragmentBatch | None = None,
                  read_size: int | None = None) -> Ingested:
    """Read a stream to its end, storing each distinct fragment once.

    `read_size` sizes the chunker's buffer; by default it is fitted to a regular file's
    size. A stream that knows its length but has no file descriptor (a file inside a
    NAR, used by annofs.nix.nar) passes it: a zero-filled 4 MiB buffer per small file
    costs more than chunking it.

    Fragments are stored before any version refers to them: a crash in between leaves
    unreferenced fragments, which gc reclaims, never a version with missing data. Each
    block of the chunker's buffer is stored in one transaction straight from the buffer
    (no copy per chunk), and hashed for the whole-file digest in one call.

    With a shared `batch`, the fragments of a stream that fits in one block stay queued
    (the caller flushes before using the result) and `new_bytes` is counted on the batch,
    not on the result (0 there).
    """
    own = batch is None
    queue = FragmentBatch(store, fragments) if batch is None else batch
    whole = blake3.blake3()
    hashes = bytearray()
    lengths = array("I")
    first = True
    buf_size = max(1, read_size) if read_size is not None else _read_size(stream)
    for block, cuts, last in stream_blocks(stream, params, buf_size):
        if not (first and last and len(cuts) == 1):
            # A one-fragment file's digest is its fragment's hash: no second pass.
            whole.update(block)
        first = False
        if not own and last:
            # Queued past this call: a copy the exact size of the data, not a view that
            # would keep the chunker's whole (zero-filled, max_size larger) buffer alive.
            block = memoryview(bytes(block))
        start = 0
        for n in cuts:
            piece = block[start : start + n]
            h = fragment_hash(piece)
            hashes += h
            lengths.append(n)
            queue.add(h, piece)
            start += n
        # The block is a view of a buffer the next pass overwrites: store it first.
        if own or not last or queue.full:
            queue.flush()
    size = sum(lengths)
    digest = bytes(hashes) if len(lengths) == 1 else whole.digest()
    return Ingested(bytes(hashes), lengths, size, digest, queue.new_bytes if own else 0)


def ingest_bytes(data: bytes, params: ChunkParams, batch: FragmentBatch) -> Ingested:
    """Chunk and hash content already in memory, queueing its fragments on `batch` (views of
    `data`, no copy); the caller flushes before using the result."""
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
