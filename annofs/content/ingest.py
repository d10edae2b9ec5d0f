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
from chunker import ChunkParams, fitted_read_size, stream_blocks
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


def _read_size(stream: BinaryIO) -> int:
    """A buffer fitted to a regular file's size: most source files are a few KiB."""
    try:
        return fitted_read_size(stream)  # type: ignore[arg-type]
    except (AttributeError, OSError, io.UnsupportedOperation):
        return DEFAULT_READ_SIZE


def ingest_stream(store: Store, fragments: FragmentStore, stream: BinaryIO,
                  params: ChunkParams, read_size: int | None = None) -> Ingested:
    """Read a stream to its end, storing each distinct fragment once.

    `read_size` sizes the chunker's buffer; by default it is fitted to a regular file's
    size (a stream that knows its length but has no file descriptor, such as a file
    inside a NAR, passes it: a zero-filled 4 MiB buffer per small file costs more than
    chunking it).

    Fragments are stored before any version refers to them: a crash in between leaves
    unreferenced fragments, which gc reclaims, never a version with missing data. Each
    block of the chunker's buffer is stored in one transaction straight from the buffer
    (no copy per chunk), and hashed for the whole-file digest in one call.
    """
    whole = blake3.blake3()
    hashes = bytearray()
    lengths = array("I")
    new = 0
    first = True
    buf_size = read_size if read_size is not None else _read_size(stream)
    for block, cuts, last in stream_blocks(stream, params, max(1, buf_size)):
        if not (first and last and len(cuts) == 1):
            # A one-fragment file's digest is its fragment's hash: no second pass.
            whole.update(block)
        first = False
        batch = []
        start = 0
        for n in cuts:
            piece = block[start : start + n]
            h = fragment_hash(piece)
            hashes += h
            lengths.append(n)
            batch.append((h, piece))
            start += n
        if batch:
            new += store_fragments(store, fragments, batch)
    size = sum(lengths)
    digest = bytes(hashes) if len(lengths) == 1 else whole.digest()
    return Ingested(bytes(hashes), lengths, size, digest, new)
