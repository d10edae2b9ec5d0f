"""Chunk, hash and store a byte stream as a fragment list."""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from annofs.content.fragments import FragmentStore, fragment_hash
from annofs.store import Store
from chunker import ChunkParams, chunk_stream

# Fragments of one stream are committed in batches of about this many bytes, so a huge
# file neither sits in memory nor holds the write lock for its whole read.
BATCH_BYTES = 64 << 20


@dataclass
class Ingested:
    """A stream as stored: its fragment list, size and whole-content digest."""

    hashes: bytes
    lengths: array
    size: int
    digest: bytes
    new_bytes: int  # payload bytes that were not in the store before


def store_fragments(store: Store, fragments: FragmentStore,
                    batch: Iterable[tuple[bytes, bytes]]) -> int:
    """Put fragments in one transaction; returns the payload bytes that were new."""
    new = 0
    with store.write() as txn:
        for h, data in batch:
            if fragments.put(txn, h, data):
                new += len(data)
    return new


def ingest_stream(store: Store, fragments: FragmentStore, stream: BinaryIO,
                  params: ChunkParams) -> Ingested:
    """Read a stream to its end, storing each distinct fragment once.

    Fragments are stored before any version refers to them: a crash in between leaves
    unreferenced fragments, which gc reclaims, never a version with missing data.
    """
    whole = blake3.blake3()
    hashes = bytearray()
    lengths = array("I")
    batch: list[tuple[bytes, bytes]] = []
    batch_bytes = new = 0
    for chunk in chunk_stream(stream, params):
        whole.update(chunk)
        h = fragment_hash(chunk)
        hashes += h
        lengths.append(len(chunk))
        batch.append((h, chunk))
        batch_bytes += len(chunk)
        if batch_bytes >= BATCH_BYTES:
            new += store_fragments(store, fragments, batch)
            batch, batch_bytes = [], 0
    if batch:
        new += store_fragments(store, fragments, batch)
    return Ingested(bytes(hashes), lengths, sum(lengths), whole.digest(), new)
