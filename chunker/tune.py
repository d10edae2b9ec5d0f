"""Measure chunk-size settings on sample versions of some data, and pick one.

Each version is a file or a directory tree. Every setting chunks every version; chunks
are identified by their BLAKE3 digest, so dedup is measured across all versions (and
within each), as a content-addressed store would see it.
"""

from __future__ import annotations

import math
import os
import stat
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

from chunker.params import ChunkParams
from chunker.stream import SupportsReadinto, chunk_stream, fitted_read_size

DEFAULT_AVG_SIZES = (4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10)

# Metadata model. A version refers to each of its chunks by BLAKE3 digest and length;
# the store keeps one index entry per unique chunk (digest, location, length, refcount).
REFERENCE_BYTES = 40  # 32-byte BLAKE3 digest + 8-byte length
INDEX_ENTRY_BYTES = 48

METADATA_MODEL = (
    f"metadata = {REFERENCE_BYTES} bytes per fragment reference (32-byte BLAKE3 + 8-byte "
    f"length) + {INDEX_ENTRY_BYTES} bytes per unique fragment (index entry); overhead = "
    "metadata / unique bytes"
)
RECOMMENDATION_RULE = (
    "the setting with the least unique bytes + metadata bytes (storage for all versions); "
    "ties go to fewer fragments"
)


class TuneInputError(Exception):
    """Input the user can fix: ``thing`` is what is wrong, ``problem`` says why."""

    def __init__(self, thing: str, problem: str) -> None:
        super().__init__(f"{thing}: {problem}")
        self.thing = thing
        self.problem = problem


def grid_params(avg_size: int) -> ChunkParams:
    """The grid's setting for an average size: min = avg/4 (rounded down), max = avg*4."""
    return ChunkParams(avg_size // 4, avg_size, avg_size * 4)


def version_files(path: Path) -> list[Path]:
    """The regular files of one version: ``path`` itself, or its tree in sorted order.

    Symbolic links inside a tree, and special files, are skipped; a named ``path`` is
    followed. OSError (missing, unreadable directory) propagates with its file name.
    """
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return [path]
    if not stat.S_ISDIR(mode):
        raise TuneInputError(str(path), "not a regular file or a directory")
    files: list[Path] = []
    _walk(path, files)
    return files


def _walk(directory: Path, out: list[Path]) -> None:
    # os.walk would swallow unreadable directories; a tuning run over part of the
    # data would silently mislead, so errors propagate.
    with os.scandir(directory) as entries:
        ordered = sorted(entries, key=lambda entry: entry.name)
    for entry in ordered:
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), out)
        elif entry.is_file(follow_symlinks=False):
            out.append(Path(entry.path))


@dataclass(frozen=True)
class SettingReport:
    """What one setting does to the sample data."""

    params: ChunkParams
    fragments: int  # chunk references over all versions
    unique_fragments: int
    total_bytes: int
    unique_bytes: int
    size_min: int
    size_median: int
    size_p90: int
    size_max: int
    seconds: float  # chunking + hashing only, reads excluded

    @property
    def dedup_ratio(self) -> float:
        return self.total_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def metadata_bytes(self) -> int:
        return REFERENCE_BYTES * self.fragments + INDEX_ENTRY_BYTES * self.unique_fragments

    @property
    def overhead(self) -> float:
        """Metadata bytes as a fraction of the unique bytes."""
        return self.metadata_bytes / self.unique_bytes if self.unique_bytes else 0.0

    @property
    def stored_bytes(self) -> int:
        """Unique bytes + metadata bytes: the quantity the recommendation minimises."""
        return self.unique_bytes + self.metadata_bytes

    @property
    def throughput_mb_s(self) -> float:
        """MB/s (10**6 bytes per second) of chunking plus BLAKE3 hashing."""
        return self.total_bytes / 1e6 / self.seconds if self.seconds > 0 else math.inf


class _TimedReader:
    """Wraps a raw file to count the time spent reading, so it can be left out."""

    def __init__(self, raw: SupportsReadinto) -> None:
        self._readinto = raw.readinto
        self.seconds = 0.0

    def readinto(self, buffer: memoryview) -> int | None:
        started = time.perf_counter()
        count = self._readinto(buffer)
        self.seconds += time.perf_counter() - started
        return count


def _nearest_rank(ordered: Sequence[int], fraction: float) -> int:
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def measure(versions: Sequence[Sequence[Path]], params: ChunkParams) -> SettingReport:
    """Chunk and hash every file of every version with ``params``.

    An OSError while reading carries the file's name.
    """
    sizes = array("Q")
    seen: set[bytes] = set()
    unique_bytes = 0
    seconds = 0.0
    for files in versions:
        for path in files:
            try:
                with open(path, "rb", buffering=0) as raw:
                    reader = _TimedReader(raw)
                    started = time.perf_counter()
                    for chunk in chunk_stream(reader, params, fitted_read_size(raw)):
                        digest = blake3.blake3(chunk).digest()
                        sizes.append(len(chunk))
                        if digest not in seen:
                            seen.add(digest)
                            unique_bytes += len(chunk)
                    seconds += time.perf_counter() - started - reader.seconds
            except OSError as exc:
                if exc.filename is not None:
                    raise
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
    ordered = sorted(sizes)
    if not ordered:
        ordered = [0]
    return SettingReport(
        params=params,
        fragments=len(sizes),
        unique_fragments=len(seen),
        total_bytes=sum(sizes),
        unique_bytes=unique_bytes,
        size_min=ordered[0],
        size_median=_nearest_rank(ordered, 0.5),
        size_p90=_nearest_rank(ordered, 0.9),
        size_max=ordered[-1],
        seconds=seconds,
    )


def recommend(reports: Iterable[SettingReport]) -> SettingReport:
    """The report that RECOMMENDATION_RULE picks."""
    return min(reports, key=lambda report: (report.stored_bytes, report.fragments))
