"""Cut points of an in-memory buffer: the hot path, a thin layer over fastcdc_cy."""

from __future__ import annotations

from collections.abc import Iterator

from chunker.params import DEFAULT_PARAMS, ChunkParams

try:
    # The compiled module directly: the top-level `fastcdc.fastcdc` silently falls back to
    # pure Python (printing a banner), which is about 100x slower than this.
    from fastcdc.fastcdc_cy import fastcdc_cy as _fastcdc_cy  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the installed wheel
    raise ImportError(
        "chunker needs the compiled fastcdc.fastcdc_cy extension of fastcdc==1.7.0 "
        "(a binary wheel, or a source build with Cython and a C compiler); the "
        "pure-Python fallback is about 100x slower and is deliberately not used"
    ) from exc

BytesLike = bytes | bytearray | memoryview


def _byte_view(data: BytesLike) -> memoryview:
    view = memoryview(data)
    # fastcdc_cy types its buffer as const uint8_t[:]; an array('I') or a 2-D view would
    # otherwise be rejected or, worse, have its length counted in items, not bytes.
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _chunks(view: memoryview, params: ChunkParams) -> Iterator:
    # fat=False and hf=None: no copy of the chunk bytes and no hashing inside fastcdc.
    return _fastcdc_cy(view, params.min_size, params.avg_size, params.max_size, False, None)


def cut_lengths(
    data: BytesLike, params: ChunkParams = DEFAULT_PARAMS, *, final: bool = True
) -> list[int]:
    """Return the lengths of the chunks of ``data`` in order; they sum to ``len(data)``.

    With ``final=False`` the buffer is taken as a prefix of a longer content: its last
    chunk is left out unless it is exactly ``max_size`` long, because a shorter last
    chunk may end only where the buffer ends rather than at a real cut. The lengths
    returned are then exactly the first cuts of the longer content; the caller keeps the
    remaining bytes and passes them again followed by more data. Empty data gives [].
    """
    lengths = [chunk.length for chunk in _chunks(_byte_view(data), params)]
    if not final and lengths and lengths[-1] != params.max_size:
        lengths.pop()
    return lengths


def iter_chunks(data: BytesLike, params: ChunkParams = DEFAULT_PARAMS) -> Iterator[memoryview]:
    """Yield a zero-copy memoryview of each chunk of an in-memory buffer, in order.

    The views share memory with ``data``: they show later changes to a mutable buffer,
    and a bytearray cannot be resized while any of them (or the iterator) is alive.
    """
    view = _byte_view(data)
    for chunk in _chunks(view, params):
        yield view[chunk.offset : chunk.offset + chunk.length]


def offset_lengths(
    data: BytesLike, min_size: int, avg_size: int, max_size: int
) -> list[tuple[int, int]]:
    """``(offset, length)`` of each chunk, for the shared check-fastcdc.py vector checker.

    Its ``--func MODULE:CALLABLE`` contract is ``(data, min_size, avg_size, max_size)``;
    this goes through ChunkParams and cut_lengths, so the checker tests the public path.
    """
    spans = []
    offset = 0
    for length in cut_lengths(data, ChunkParams(min_size, avg_size, max_size)):
        spans.append((offset, length))
        offset += length
    return spans
