"""Deterministic test data: the same seed gives the same bytes on every machine and run.

`mixed_files` makes a set of in-memory files of varied sizes and kinds, so that an ingest
measurement sees what a real tree holds: incompressible bytes, text, blocks repeated
across files (real deduplication), and near-copies of earlier files (small edits).
Everything comes from `random.Random(seed)`, whose output is stable across CPython
versions for `randbytes`, `randrange`, `choices` and `random`.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections import Counter
from dataclasses import dataclass

KIB = 1 << 10
MIB = 1 << 20

# Share of files of each kind (by count; sizes are drawn the same way for all kinds).
KIND_WEIGHTS = {"random": 0.35, "text": 0.30, "repeat": 0.25, "edited": 0.10}
MIN_FILE = 1 * KIB
MAX_FILE = 16 * MIB

_POOL_BLOCKS = 48
_POOL_BLOCK_SIZE = 96 * KIB
_VOCABULARY = 6000
_LINES = 40_000


@dataclass(frozen=True)
class GeneratedFile:
    """One generated file: a path-like name, how it was made, and its bytes."""

    name: str
    kind: str
    data: bytes


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        # Blocks that "repeat" files are assembled from: chunks inside them recur.
        self.pool = [rng.randbytes(_POOL_BLOCK_SIZE) for _ in range(_POOL_BLOCKS)]
        letters = string.ascii_lowercase
        words = [
            "".join(rng.choices(letters, k=rng.randrange(2, 11))) for _ in range(_VOCABULARY)
        ]
        # A word-frequency skew like natural text: earlier words are far more common.
        cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(_VOCABULARY)))
        self.lines = [
            " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randrange(3, 15))).encode()
            for _ in range(_LINES)
        ]
        self.mean_line = sum(map(len, self.lines)) / len(self.lines) + 1

    def size(self) -> int:
        """A size drawn log-uniformly from MIN_FILE to MAX_FILE: many small, a few large."""
        return int(math.exp(self.rng.uniform(math.log(MIN_FILE), math.log(MAX_FILE))))

    def random(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def text(self, size: int) -> bytes:
        """Lines of shuffled words; lines are drawn independently, so chunks rarely recur."""
        out = bytearray()
        while len(out) < size:
            count = int((size - len(out)) / self.mean_line) + 1
            out += b"\n".join(self.rng.choices(self.lines, k=count))
            out += b"\n"
        return bytes(out[:size])

    def repeat(self, size: int) -> bytes:
        """Pool blocks in random order, some separated by a few random bytes (insertions)."""
        out = bytearray()
        rng = self.rng
        while len(out) < size:
            out += self.pool[rng.randrange(_POOL_BLOCKS)]
            if rng.random() < 0.3:
                out += rng.randbytes(rng.randrange(1, 200))
        return bytes(out[:size])

    def edited(self, earlier: list[GeneratedFile]) -> bytes:
        """A copy of an earlier file with one to three small in-place changes."""
        rng = self.rng
        source = earlier[rng.randrange(len(earlier))].data
        data = bytearray(source)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data))
            patch = rng.randbytes(min(rng.randrange(1, 64), len(data) - at))
            data[at : at + len(patch)] = patch
        return bytes(data)


def mixed_files(total_bytes: int, seed: int = 20_24) -> list[GeneratedFile]:
    """Files of mixed kinds and sizes whose sizes add up to exactly `total_bytes`.

    Kinds: ``random`` (incompressible, unique), ``text`` (lines of words from a seeded
    vocabulary), ``repeat`` (blocks from a shared 4.5 MiB pool, with insertions: most of
    their chunks are duplicates), ``edited`` (a copy of an earlier file with a few bytes
    changed: all but one to three chunks are duplicates). Sizes are log-uniform between
    1 KiB and 16 MiB; the last file is cut to make the total exact.
    """
    if total_bytes < 0:
        raise ValueError(f"total_bytes {total_bytes} must not be negative")
    gen = _Generator(seed)
    kinds = list(KIND_WEIGHTS)
    weights = list(KIND_WEIGHTS.values())
    files: list[GeneratedFile] = []
    made = 0
    while made < total_bytes:
        kind = gen.rng.choices(kinds, weights)[0]
        if kind == "edited" and not files:
            kind = "random"
        size = min(gen.size(), total_bytes - made)
        if kind == "edited":
            data = gen.edited(files)[: total_bytes - made]
        else:
            data = getattr(gen, kind)(size)
        files.append(GeneratedFile(f"{len(files):05d}.{kind}", kind, data))
        made += len(data)
    return files


def describe(files: list[GeneratedFile]) -> str:
    """One line: file count, total size and the share of bytes of each kind."""
    total = sum(len(f.data) for f in files)
    by_kind: Counter[str] = Counter()
    for f in files:
        by_kind[f.kind] += len(f.data)
    shares = ", ".join(
        f"{kind} {100 * by_kind[kind] / total:.0f}%" for kind in KIND_WEIGHTS if total
    )
    sizes = sorted(len(f.data) for f in files)
    median = sizes[len(sizes) // 2] if sizes else 0
    return (f"{len(files)} files, {total / MIB:.0f} MiB (median file {median / KIB:.0f} KiB, "
            f"largest {sizes[-1] / MIB if sizes else 0:.1f} MiB); bytes by kind: {shares}")
