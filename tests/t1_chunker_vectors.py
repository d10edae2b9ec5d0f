"""chunker against the FastCDC reference vectors carried in tests/vectors/fastcdc.

The vectors (image, expected cut points, their README) were copied from the shared
reference set beside the project (its vectors/fastcdc folder), so a clone anywhere can
run this test.

The ronomon sets are what fastcdc 1.7.0 (PyPI) and fastcdc-rs's ronomon module assert
on SekienAkashita.jpg. Every entry point must give exactly those cuts, and BLAKE3 of
each chunk must match, since annofs keys fragments by it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import blake3
import pytest

from chunker import ChunkParams, chunk_file, chunk_stream, cut_lengths, iter_chunks

VECTORS = Path(__file__).resolve().parent / "vectors" / "fastcdc"
DOC = json.loads((VECTORS / "expected.json").read_text())
IMAGE = (VECTORS / DOC["file"]).read_bytes()

RONOMON_SETS = [s for s in DOC["sets"] if s["algorithm"] == "ronomon"]
PAPER_SETS = [s for s in DOC["sets"] if s["algorithm"] != "ronomon"]
ZEROS = DOC["extra"]["all_zeros_10240"]
COUNT_ONLY = DOC["extra"]["ronomon-256-1024-8192"]

# Cases with recorded (offset, length) lists: (id, params, data, expected chunks).
EXACT_CASES = [
    pytest.param(ChunkParams(s["min_size"], s["avg_size"], s["max_size"]), IMAGE, s["chunks"],
                 id=s["name"])
    for s in RONOMON_SETS
] + [
    pytest.param(ChunkParams(ZEROS["min_size"], ZEROS["avg_size"], ZEROS["max_size"]),
                 bytes(10240), ZEROS["chunks"], id="all-zeros-10240"),
]  # fmt: skip

# Every buffer and parameter set, for the entry points' agreement.
ALL_INPUTS = [
    pytest.param(ChunkParams(s["min_size"], s["avg_size"], s["max_size"]), IMAGE, id=s["name"])
    for s in RONOMON_SETS
] + [
    pytest.param(
        ChunkParams(COUNT_ONLY["min_size"], COUNT_ONLY["avg_size"], COUNT_ONLY["max_size"]),
        IMAGE, id="ronomon-256-1024-8192"),
] + [
    pytest.param(ChunkParams(ZEROS["min_size"], ZEROS["avg_size"], ZEROS["max_size"]),
                 bytes(10240), id="all-zeros-10240"),
]  # fmt: skip

# 7000 is below every max_size here, 65537 is just above 64 KiB: both make chunk_stream
# carry unfinished chunks across refills, at different phases.
READ_SIZES = [7000, 65536 + 1]


def spans(lengths: list[int]) -> list[tuple[int, int]]:
    out, offset = [], 0
    for length in lengths:
        out.append((offset, length))
        offset += length
    return out


def test_image_is_the_reference_one() -> None:
    assert len(IMAGE) == DOC["size"]
    assert hashlib.sha256(IMAGE).hexdigest() == DOC["sha256"]
    assert blake3.blake3(IMAGE).hexdigest() == DOC["blake3"]


@pytest.mark.parametrize(("params", "data", "chunks"), EXACT_CASES)
def test_exact_cuts(params: ChunkParams, data: bytes, chunks: list[dict]) -> None:
    assert spans(cut_lengths(data, params)) == [(c["offset"], c["length"]) for c in chunks]


@pytest.mark.parametrize(("params", "data", "chunks"), EXACT_CASES)
def test_chunk_digests(params: ChunkParams, data: bytes, chunks: list[dict]) -> None:
    got = [(blake3.blake3(view).hexdigest(), len(view)) for view in iter_chunks(data, params)]
    if "blake3" in chunks[0]:
        assert got == [(c["blake3"], c["length"]) for c in chunks]
        assert [hashlib.sha256(v).hexdigest() for v in iter_chunks(data, params)] == [
            c["sha256"] for c in chunks
        ]
    else:  # the zeros case records no digests: every chunk is max_size zero bytes
        assert got == [(blake3.blake3(bytes(c["length"])).hexdigest(), c["length"]) for c in chunks]


def test_97_chunk_count() -> None:
    params = ChunkParams(COUNT_ONLY["min_size"], COUNT_ONLY["avg_size"], COUNT_ONLY["max_size"])
    lengths = cut_lengths(IMAGE, params)
    assert len(lengths) == COUNT_ONLY["chunk_count"] == 97
    assert b"".join(iter_chunks(IMAGE, params)) == IMAGE


def test_readme_example_4k_16k_65535() -> None:
    # The vectors README quotes this ronomon result next to the paper variants' cuts.
    want = [22366, 10491, 14094, 18696, 43819]
    assert cut_lengths(IMAGE, ChunkParams(4096, 16384, 65535)) == want


@pytest.mark.parametrize("case", PAPER_SETS, ids=[s["name"] for s in PAPER_SETS])
def test_paper_variants_are_not_this_algorithm(case: dict) -> None:
    # Documents the variant: v2016/v2020 cut elsewhere. Only where the paper variant
    # leaves the image as one chunk can the two agree, trivially.
    params = ChunkParams(case["min_size"], case["avg_size"], case["max_size"])
    paper = [(c["offset"], c["length"]) for c in case["chunks"]]
    ours = spans(cut_lengths(IMAGE, params))
    assert ours != paper or paper == [(0, len(IMAGE))]


@pytest.mark.parametrize("read_size", READ_SIZES)
@pytest.mark.parametrize(("params", "data"), ALL_INPUTS)
def test_entry_points_agree(params: ChunkParams, data: bytes, read_size: int) -> None:
    lengths = cut_lengths(data, params)
    views = list(iter_chunks(data, params))
    streamed = list(chunk_stream(io.BytesIO(data), params, read_size=read_size))
    assert [len(v) for v in views] == lengths
    assert [len(c) for c in streamed] == lengths
    assert [bytes(v) for v in views] == streamed
    assert b"".join(streamed) == data


@pytest.mark.parametrize(("params", "data"), ALL_INPUTS)
def test_chunk_file_agrees(params: ChunkParams, data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(data)
    assert [len(c) for c in chunk_file(path, params)] == cut_lengths(data, params)
