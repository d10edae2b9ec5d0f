"""Content-defined chunking: cut bytes into chunks whose boundaries follow the content.

The algorithm is FastCDC in its **ronomon** variant, exactly as implemented by the PyPI
package ``fastcdc`` 1.7.0 in its compiled Cython module ``fastcdc.fastcdc_cy`` (a port of
the ``ronomon/deduplication`` JavaScript code). It is *not* the 2016 (USENIX ATC) or
2020 (TPDS) paper algorithm of e.g. fastcdc-rs ``v2016``/``v2020``, which cut elsewhere:

- 32-bit gear hash ``h = (h >> 1) + GEAR[byte]`` with the package's fixed table;
- no seed, and no normalisation level parameter: normalisation is fixed at one level,
  a mask of round(log2(avg_size))+1 bits from ``min_size`` up to ronomon's "center
  size" ``avg_size - 1.5 * min_size`` into the chunk, then one of log2(avg)-1 bits;
- hashing starts ``min_size`` bytes past the previous cut (cut-point skipping), and a
  chunk is cut at ``max_size`` if no hash matched before.

Boundaries are position-independent given a start at a cut: the hash starts from zero at
every cut, so where the next cut falls depends only on the bytes after the previous one.
Re-chunking from any earlier cut point therefore gives the same cuts as a whole-file
pass, which lets a caller re-chunk only around an edit, and lets ``chunk_stream`` cut a
stream of any size in bounded memory with exactly the cuts of ``cut_lengths``. The
boundaries are pinned by tests against the shared reference vectors
(``tests/t1_chunker_vectors.py``); a fastcdc upgrade that moves them fails there.

Public names::

    ChunkParams, ChunkParamsError, DEFAULT_PARAMS   # parameters (chunker.params)
    cut_lengths, iter_chunks                        # in-memory buffers (chunker.cut)
    chunk_stream, chunk_file                        # streams and files (chunker.stream)
    stream_blocks, fitted_read_size                 # block-level streaming (chunker.stream)

``python -m chunker tune`` compares average sizes on sample versions of some data.
"""

from chunker.cut import cut_lengths, iter_chunks
from chunker.params import DEFAULT_PARAMS, ChunkParams, ChunkParamsError
from chunker.stream import chunk_file, chunk_stream, fitted_read_size, stream_blocks

__all__ = [
    "DEFAULT_PARAMS",
    "ChunkParams",
    "ChunkParamsError",
    "chunk_file",
    "chunk_stream",
    "cut_lengths",
    "fitted_read_size",
    "iter_chunks",
    "stream_blocks",
]
