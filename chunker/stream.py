"""Chunks of a stream or a file of any size, in bounded memory, with whole-buffer cuts."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from typing import Protocol

from chunker.cut import cut_lengths
from chunker.params import DEFAULT_PARAMS, ChunkParams

DEFAULT_READ_SIZE = 4 << 20


class SupportsReadinto(Protocol):
    """A binary stream that can fill a caller's buffer (files, sockets, BytesIO)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class SupportsRead(Protocol):
    """A binary stream that can only hand out new bytes objects."""

    def read(self, size: int, /) -> bytes: ...


Readable = SupportsReadinto | SupportsRead
StrOrBytesPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _filler(readable: Readable) -> Callable[[memoryview], int]:
    """A function that reads into the given view and returns the count, 0 at EOF."""
    readinto = getattr(readable, "readinto", None)
    if readinto is not None:

        def fill(target: memoryview) -> int:
            count = readinto(target)
            if count is None:
                # A non-blocking stream with nothing ready; treating it as EOF would
                # silently truncate the content.
                raise BlockingIOError("chunk_stream needs a blocking stream")
            return count

        return fill
    read = getattr(readable, "read", None)
    if read is None:
        raise TypeError(f"{type(readable).__name__} object has neither readinto nor read")

    def fill_by_read(target: memoryview) -> int:
        data = read(len(target))
        if data is None:
            raise BlockingIOError("chunk_stream needs a blocking stream")
        target[: len(data)] = data
        return len(data)

    return fill_by_read


def chunk_stream(
    readable: Readable,
    params: ChunkParams = DEFAULT_PARAMS,
    read_size: int = DEFAULT_READ_SIZE,
) -> Iterator[bytes]:
    """Yield the bytes of each chunk of a binary stream, read to its end.

    The cuts are exactly those ``cut_lengths`` gives on the whole content. Memory is one
    buffer of ``read_size + params.max_size`` bytes plus the chunk being yielded. The
    stream may be anything with ``readinto`` (preferred: no extra copy) or ``read``; it
    is not closed. Arguments are checked at the call; read errors surface while iterating.
    """
    if not isinstance(read_size, int) or isinstance(read_size, bool) or read_size < 1:
        raise ValueError(f"read_size {read_size!r} must be a positive int")
    return _chunks_of(_filler(readable), params, read_size)


def _chunks_of(
    fill: Callable[[memoryview], int], params: ChunkParams, read_size: int
) -> Iterator[bytes]:
    for block, lengths, _last in _blocks_of(fill, params, read_size):
        start = 0
        for length in lengths:
            yield bytes(block[start : start + length])
            start += length


def stream_blocks(
    readable: Readable,
    params: ChunkParams = DEFAULT_PARAMS,
    read_size: int = DEFAULT_READ_SIZE,
) -> Iterator[tuple[memoryview, list[int], bool]]:
    """Yield ``(block, lengths, last)``: each buffer's final bytes and their cut lengths.

    The concatenated blocks are the stream; ``lengths`` cut each block exactly as
    ``chunk_stream`` would. ``block`` is a view of the internal buffer, valid only until
    the next iteration: consumers that hash or store as they go avoid a copy per chunk.
    ``last`` is True for the final block (which may be empty for an empty stream).
    """
    if not isinstance(read_size, int) or isinstance(read_size, bool) or read_size < 1:
        raise ValueError(f"read_size {read_size!r} must be a positive int")
    return _blocks_of(_filler(readable), params, read_size)


def _blocks_of(
    fill: Callable[[memoryview], int], params: ChunkParams, read_size: int
) -> Iterator[tuple[memoryview, list[int], bool]]:
    capacity = read_size + params.max_size
    buffer = bytearray(capacity)
    view = memoryview(buffer)
    filled = 0
    at_eof = False
    while not at_eof:
        # Fill completely (pipes and sockets return short reads) so each pass cuts a
        # full buffer: more than max_size bytes, hence at least one final chunk.
        while filled < capacity:
            count = fill(view[filled:])
            if not count:
                at_eof = True
                break
            filled += count
        lengths = cut_lengths(view[:filled], params, final=at_eof)
        done = sum(lengths)
        yield view[:done], lengths, at_eof
        # The unfinished last chunk (shorter than max_size) moves to the front and is cut
        # again with the next read. Cuts do not depend on bytes before the previous cut,
        # so this gives the whole-content cuts. memoryview assignment handles the overlap.
        view[: filled - done] = view[done:filled]
        filled -= done


def fitted_read_size(file: io.FileIO, read_size: int = DEFAULT_READ_SIZE) -> int:
    """``read_size``, lowered to the size of a regular file if that is smaller.

    chunk_stream's buffer is zero-filled at allocation; for a tree of small files a full
    4 MiB buffer each would cost more than chunking them. A file that grows while being
    read is still chunked whole, only in more passes.
    """
    info = os.fstat(file.fileno())
    if not stat.S_ISREG(info.st_mode):
        return read_size  # pipes and devices report no meaningful size
    return max(1, min(read_size, info.st_size))


def chunk_file(path: StrOrBytesPath, params: ChunkParams = DEFAULT_PARAMS) -> Iterator[bytes]:
    """Yield the bytes of each chunk of the file at ``path`` (see ``chunk_stream``).

    The file is opened when iteration starts and closed when it ends or the iterator is
    closed, so an open error such as FileNotFoundError surfaces at the first ``next``.
    """
    # Unbuffered: FileIO.readinto fills chunk_stream's buffer directly, with no second copy.
    with open(path, "rb", buffering=0) as file:
        yield from chunk_stream(file, params, fitted_read_size(file))
