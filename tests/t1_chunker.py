"""chunker units: parameters, stream/buffer agreement, cut stability, recorded cuts, tune CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import subprocess
import sys
from array import array
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from fastcdc.fastcdc_cy import fastcdc_cy  # type: ignore[import-untyped]
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chunker import (
    DEFAULT_PARAMS,
    ChunkParams,
    ChunkParamsError,
    chunk_file,
    chunk_stream,
    cut_lengths,
    iter_chunks,
)
from chunker.stream import Readable
from chunker.tune import INDEX_ENTRY_BYTES, REFERENCE_BYTES, grid_params, measure, recommend

REPO = Path(__file__).resolve().parents[1]
SMALL = ChunkParams(64, 256, 1024)  # many chunks in little data: fast property tests
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def seeded(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def mixed(seed: int, size: int) -> bytes:
    """Random bytes with zero runs, so that some chunks are cut at max_size."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += (
            rng.randbytes(rng.randrange(1, 3000))
            if rng.random() < 0.6
            else bytes(rng.randrange(1, 3000))
        )
    return bytes(out[:size])


def offsets(lengths: list[int]) -> list[int]:
    out, offset = [], 0
    for length in lengths:
        out.append(offset)
        offset += length
    return out


# --- parameters -----------------------------------------------------------------------

INVALID = [
    (dict(min_size=20000), "min_size 20000 must be less than avg_size 16384"),
    (dict(min_size=16384), "min_size 16384 must be less than avg_size 16384"),
    (dict(avg_size=65536), "avg_size 65536 must be less than max_size 65536"),
    (dict(min_size=63), "min_size 63 must be between 64 and 67108864"),
    (dict(min_size=67108865, avg_size=1 << 27, max_size=1 << 28),
     "min_size 67108865 must be between 64 and 67108864"),
    (dict(min_size=64, avg_size=255), "avg_size 255 must be between 256 and 268435456"),
    (dict(avg_size=268435457, max_size=1 << 30),
     "avg_size 268435457 must be between 256 and 268435456"),
    (dict(min_size=64, avg_size=256, max_size=1023),
     "max_size 1023 must be between 1024 and 1073741824"),
    (dict(max_size=(1 << 30) + 1), "max_size 1073741825 must be between 1024 and 1073741824"),
    (dict(min_size=4096.0), "min_size 4096.0 must be an int, not float"),
    (dict(avg_size="16k"), "avg_size '16k' must be an int, not str"),
    (dict(max_size=True), "max_size True must be an int, not bool"),
    (dict(min_size=None), "min_size None must be an int, not NoneType"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), INVALID)
def test_invalid_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ChunkParamsError) as info:
        ChunkParams(**kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_defaults_and_frozen() -> None:
    assert ChunkParams(4096, 16384, 65536) == DEFAULT_PARAMS
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_PARAMS.min_size = 1  # type: ignore[misc]


# One value at each end of each range, and one just outside it.
RANGE_EDGES = [
    ("min_size", 64, 63, dict(avg_size=256, max_size=1024)),
    ("min_size", 67_108_864, 67_108_865, dict(avg_size=1 << 27, max_size=1 << 28)),
    ("avg_size", 256, 255, dict(min_size=64, max_size=1024)),
    ("avg_size", 268_435_456, 268_435_457, dict(min_size=64, max_size=1 << 30)),
    ("max_size", 1024, 1023, dict(min_size=64, avg_size=256)),
    ("max_size", 1 << 30, (1 << 30) + 1, dict(min_size=64, avg_size=256)),
]


@pytest.mark.parametrize(("field", "inside", "outside", "others"), RANGE_EDGES)
def test_ranges_are_fastcdcs(field: str, inside: int, outside: int, others: dict) -> None:
    # ChunkParams accepts exactly what fastcdc_cy's asserts accept, so a valid
    # ChunkParams never meets a bare AssertionError from inside fastcdc.
    params = ChunkParams(**{field: inside}, **others)
    assert sum(cut_lengths(seeded(0, 5000), params)) == 5000
    with pytest.raises(ChunkParamsError, match=f"^{field} {outside} must be between"):
        ChunkParams(**{field: outside}, **others)
    values = {**others, field: outside}
    with pytest.raises(AssertionError):
        fastcdc_cy(b"", values["min_size"], values["avg_size"], values["max_size"], False, None)


@pytest.mark.parametrize(
    ("text", "params", "canonical"),
    [
        ("4k/16k/64k", DEFAULT_PARAMS, "4k/16k/64k"),
        ("4096/16384/65536", DEFAULT_PARAMS, "4k/16k/64k"),
        (" 4K / 16k / 64K ", DEFAULT_PARAMS, "4k/16k/64k"),
        ("1m/2m/4m", ChunkParams(1 << 20, 2 << 20, 4 << 20), "1m/2m/4m"),
        ("1536/4k/1024k", ChunkParams(1536, 4096, 1 << 20), "1536/4k/1m"),
        ("64/256/1024", SMALL, "64/256/1k"),
    ],
)
def test_parse_and_str(text: str, params: ChunkParams, canonical: str) -> None:
    assert ChunkParams.parse(text) == params
    assert str(params) == canonical
    assert ChunkParams.parse(str(params)) == params


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4k/16k", "chunk params '4k/16k' must be MIN/AVG/MAX, e.g. 4k/16k/64k"),
        ("4k/16k/64k/1m", "chunk params '4k/16k/64k/1m' must be MIN/AVG/MAX, e.g. 4k/16k/64k"),
        ("4k/16x/64k", "chunk size '16x' must be an integer with an optional k or m suffix"),
        ("4k//64k", "chunk size '' must be an integer with an optional k or m suffix"),
        ("-4k/16k/64k", "chunk size '-4k' must be an integer with an optional k or m suffix"),
        ("64k/16k/256k", "min_size 65536 must be less than avg_size 16384"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ChunkParamsError) as info:
        ChunkParams.parse(text)
    assert str(info.value) == message


SIZES = st.one_of(
    st.integers(64, 1 << 22),
    st.integers(1, 4096).map(lambda k: k << 10),
    st.integers(1, 64).map(lambda m: m << 20),
)


@FAST
@given(st.lists(SIZES, min_size=3, max_size=3, unique=True))
def test_parse_str_round_trip(values: list[int]) -> None:
    low, avg, high = sorted(values)
    try:
        params = ChunkParams(low, avg, high)
    except ChunkParamsError:
        assume(False)
        raise
    assert ChunkParams.parse(str(params)) == params


# --- buffers and streams ----------------------------------------------------------------


class ReadOnly:
    """Only .read, as some wrappers offer."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def read(self, size: int) -> bytes:
        return self._stream.read(size)


class Trickle(io.RawIOBase):
    """readinto that returns at most `step` bytes, like a pipe or a socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:count] = self._data[self._pos : self._pos + count]
        self._pos += count
        return count


READERS: dict[str, Callable[[bytes], Readable]] = {
    "bytesio": lambda data: io.BytesIO(data),
    "read-only": ReadOnly,
    "trickle": lambda data: Trickle(data, 333),
}


def boundary_sizes(params: ChunkParams) -> list[int]:
    m = params.max_size
    return [0, 1, params.min_size, m - 1, m, m + 1, 2 * m, 3 * m + 17]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("read_size", [1, 100, 4 << 20])
@pytest.mark.parametrize(
    ("params", "size"),
    [(p, n) for p in (SMALL, DEFAULT_PARAMS) for n in boundary_sizes(p)],
    ids=lambda v: str(v),
)
def test_stream_equals_whole_buffer(params: ChunkParams, size: int, read_size: int, reader: str):
    for data in (seeded(size, size), bytes(size)):
        lengths = cut_lengths(data, params)
        assert sum(lengths) == size
        streamed = list(chunk_stream(READERS[reader](data), params, read_size=read_size))
        assert [len(c) for c in streamed] == lengths
        assert b"".join(streamed) == data
        assert all(isinstance(c, bytes) for c in streamed)


@FAST
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, 12_000),
    read_size=st.integers(1, 3000),
    reader=st.sampled_from(sorted(READERS)),
)
def test_stream_equals_whole_buffer_random(seed: int, size: int, read_size: int, reader: str):
    data = mixed(seed, size)
    streamed = list(chunk_stream(READERS[reader](data), SMALL, read_size=read_size))
    assert [len(c) for c in streamed] == cut_lengths(data, SMALL)
    assert b"".join(streamed) == data


def test_empty() -> None:
    assert cut_lengths(b"") == []
    assert cut_lengths(b"", final=False) == []
    assert list(iter_chunks(b"")) == []
    assert list(chunk_stream(io.BytesIO(b""))) == []


def test_final_false_keeps_only_real_cuts() -> None:
    zeros = bytes(10 * 1024)  # zeros never match a mask: every cut is forced at max_size
    assert cut_lengths(zeros, SMALL, final=False) == [1024] * 10
    assert cut_lengths(zeros + bytes(5), SMALL, final=False) == [1024] * 10
    assert cut_lengths(seeded(1, 50), SMALL, final=False) == []
    data = seeded(2, 5000)
    whole = cut_lengths(data, SMALL)
    assert whole[-1] != SMALL.max_size
    assert cut_lengths(data, SMALL, final=False) == whole[:-1]


@FAST
@given(seed=st.integers(0, 2**32), cut=st.floats(0, 1))
def test_prefix_cuts_are_final(seed: int, cut: float) -> None:
    # The contract chunk_stream relies on: the final=False cuts of any prefix are
    # the first cuts of the whole content.
    data = mixed(seed, 20_000)
    prefix = data[: int(cut * len(data))]
    partial = cut_lengths(prefix, SMALL, final=False)
    assert partial == cut_lengths(data, SMALL)[: len(partial)]
    assert len(prefix) - sum(partial) < SMALL.max_size


@FAST
@given(seed=st.integers(0, 2**32), pick=st.floats(0, 1))
def test_rechunk_from_an_earlier_cut(seed: int, pick: float) -> None:
    data = mixed(seed, 30_000)
    lengths = cut_lengths(data, SMALL)
    index = int(pick * (len(lengths) - 1))
    start = offsets(lengths)[index]
    tail = memoryview(data)[start:]
    assert cut_lengths(tail, SMALL) == lengths[index:]
    assert [len(v) for v in iter_chunks(tail, SMALL)] == lengths[index:]


def test_rechunk_from_an_earlier_cut_default_params() -> None:
    data = seeded(7, 1 << 20)
    lengths = cut_lengths(data)
    starts = offsets(lengths)
    for index in (1, len(lengths) // 2, len(lengths) - 1):
        assert cut_lengths(data[starts[index] :]) == lengths[index:]
    # Re-chunk only a middle stretch, as annofs does around an edit: from a cut up to
    # somewhere later, final=False gives the whole-file cuts of that stretch.
    middle = cut_lengths(data[starts[3] : starts[3] + 200_000], final=False)
    assert middle == lengths[3 : 3 + len(middle)]


def test_iter_chunks_is_zero_copy() -> None:
    data = bytearray(seeded(3, 100_000))
    views = list(iter_chunks(data))
    assert [len(v) for v in views] == cut_lengths(data)
    assert all(v.obj is data for v in views)
    data[0] ^= 0xFF
    assert views[0][0] == data[0]
    for view in views:
        view.release()


def test_non_byte_buffers_count_bytes() -> None:
    words = memoryview(array("I", range(50_000)))  # format "I": len() counts 4-byte items
    assert sum(cut_lengths(words, SMALL)) == words.nbytes
    assert b"".join(iter_chunks(words, SMALL)) == words.tobytes()
    assert cut_lengths(words, SMALL) == cut_lengths(words.tobytes(), SMALL)


def test_stream_argument_errors() -> None:
    with pytest.raises(TypeError, match="neither readinto nor read"):
        chunk_stream(object())  # type: ignore[arg-type]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="read_size"):
            chunk_stream(io.BytesIO(b"x"), read_size=bad)  # type: ignore[arg-type]

    class NonBlocking:
        def readinto(self, buffer: memoryview) -> None:
            return None

    with pytest.raises(BlockingIOError):
        list(chunk_stream(NonBlocking()))


def test_chunk_file(tmp_path: Path) -> None:
    data = mixed(11, 300_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    for name in (path, str(path), os.fsencode(path)):
        assert [len(c) for c in chunk_file(name, SMALL)] == cut_lengths(data, SMALL)
    (tmp_path / "empty").write_bytes(b"")
    assert list(chunk_file(tmp_path / "empty")) == []
    with pytest.raises(FileNotFoundError):
        next(chunk_file(tmp_path / "missing"))


def test_missing_compiled_module_fails_loudly() -> None:
    code = "import sys; sys.modules['fastcdc.fastcdc_cy'] = None; import chunker"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "ImportError: chunker needs the compiled fastcdc.fastcdc_cy" in result.stderr


# --- stability under edits --------------------------------------------------------------

BASE = seeded(99, 4 << 20)
BASE_LENGTHS = cut_lengths(BASE)
BASE_STARTS = offsets(BASE_LENGTHS)
MID = len(BASE_LENGTHS) // 2


def _edits() -> list:
    cut = BASE_STARTS[MID]  # a cut point near the middle
    positions = {
        "mid": len(BASE) // 2,
        "at-cut": cut,
        "before-cut": cut - 1,
        "in-min-skip": cut + 100,  # inside the first min_size bytes, which are not hashed
        "third": len(BASE) // 3 + 12345,
    }
    changes = {
        "insert-1": lambda d, p: d[:p] + b"X" + d[p:],
        "insert-7": lambda d, p: d[:p] + b"1234567" + d[p:],
        "delete-1": lambda d, p: d[:p] + d[p + 1 :],
        "delete-5": lambda d, p: d[:p] + d[p + 5 :],
        "overwrite-3": lambda d, p: d[:p] + bytes(b ^ 0x55 for b in d[p : p + 3]) + d[p + 3 :],
    }
    return [
        pytest.param(pos, change, id=f"{pname}-{cname}")
        for pname, pos in positions.items()
        for cname, change in changes.items()
    ]


def digests(data: bytes) -> list[bytes]:
    return [blake3.blake3(view).digest() for view in iter_chunks(data)]


BASE_DIGESTS = digests(BASE)


@pytest.mark.parametrize(("position", "change"), _edits())
def test_edit_changes_only_nearby_chunks(position: int, change) -> None:
    old = BASE_DIGESTS
    new = digests(change(BASE, position))
    # index of the chunk holding the edit (for an edit at a cut: the chunk it starts)
    edited = max(i for i, start in enumerate(BASE_STARTS) if start <= position)
    before = max(0, edited - 2)
    assert new[:before] == old[:before]
    after = len(old) - (edited + 3)  # old chunks more than 2 past the edited one
    if after > 0:
        assert new[-after:] == old[-after:]
    shorter = min(len(old), len(new))
    prefix = next((i for i in range(shorter) if old[i] != new[i]), shorter)
    suffix = 0
    while suffix < shorter - prefix and old[-1 - suffix] == new[-1 - suffix]:
        suffix += 1
    # Cuts before the edit cannot move (they depend only on earlier bytes); after it the
    # cuts resynchronise at the first new cut that lands on an old one.
    assert len(old) - prefix - suffix <= 3
    assert len(new) - prefix - suffix <= 3


# --- recorded cuts (restic style): any change of boundaries shows here as a diff --------

RECORDED_INPUT = seeded(1234, 1 << 20)  # random.Random(1234).randbytes(1 MiB)
RECORDED = {
    "4k/16k/64k": (53, [
        (10258, "31b49e0e98a491c500b2d463ead0ddef11a883716e163fef2d7b6e4ec9d58a5a"),
        (10624, "fb3f4a764af2a8808f200b5658eb8ed7e129be78bb9861bd636433a50de25962"),
        (26216, "6495bf1ff428690c8cfe11eea5acec4f01a8122ef7598a7fbaedd4b981dc6276"),
        (6423, "9df4fb2577a04d8896efd55d126fdc7cd911fd5bc88c8804d0ee9f7fabd4ac60"),
        (6957, "1875ae5d737597741203eeb96fd6a236bf7950a7d5df92935d0078cdb2c4a74b"),
        (13510, "585c9b66b74fe9910502c059af296cef6ccc4a9ca7bb85e529c9e6582e19c638"),
        (22562, "22c0c0bca066eaa9dab445b6b2d442fd0081797993e44266d4057f7639f3c148"),
        (12651, "81e25bb2d07d187cdbf6b1a08d36cb9ef1d787c1a10862b495892873cd335d8e"),
    ]),
    "64/256/1k": (4040, [
        (380, "0aa608ea8bb89525973374b6bab63c0a21604c60ca10e271b72a51e17117457d"),
        (87, "522e6fcea8712a4674c47be8250158547d8be9f773dc5c0e4b0fc4fa44c5b5bf"),
        (222, "beb7798228872076267ae7d91bf5920bcbe914aff39c95d86638b29cf9b44dc5"),
        (914, "eafabe52e4178bcaf34bbfe5221b539e40a49138392e91ceb38fab7f4b2fc725"),
        (181, "8bb2628c6d762bc90c71f6a0e21f86d82a452917e18c46a1b272dce216453ebe"),
        (245, "9fbd7e608e4cdf9915d199610b0571c5cef70a99c7579db6a19dea86ac390577"),
        (508, "0220edc3d32f91adbf64da8511056af67c7fd84ed88a6c6fe4a0e6003e40e296"),
        (181, "55145ea06b9dd317cdcf60b97077c7b7dea4767bb2f4e9babc998cb11d9bb58e"),
    ]),
    "16k/64k/256k": (15, [
        (53521, "5f3e98439ece0ef8bea54f2d31666d9071da2d488260430ad654b9af7861c287"),
        (20467, "0fa76df33c70db04617a60cb6ca0e34bfae8c46b11ffe73482578073fc5fa6a1"),
        (48830, "068a4c615cb88d3660ea05a198ac733a6cc9fa886d9cb87bd242edeeeaa9ac83"),
        (71258, "8f50e4d24fe197816455b6c36f42e2d168bc759c6c9ccabe992a556c219a1e41"),
        (85508, "c2536bdeddcd6b38e705f2018a8899f4f637e5a3cd38ee11ce06435a1e67a74d"),
        (87198, "f1a04671bd101f3f2e9bbb76135a1552b192f7d8af48331f9126d5bd30472e4f"),
        (40066, "abe3699596efe0414e4b9126fce5d5f32784ed4f3af03e25ddfe80d66a4ba0b1"),
        (53080, "7846cd499dbf66bb457c9178022c70bf2190245b8548adc5b4b7ff30fda13843"),
    ]),
}  # fmt: skip


@pytest.mark.parametrize("text", RECORDED)
def test_recorded_cuts(text: str) -> None:
    count, first = RECORDED[text]
    params = ChunkParams.parse(text)
    got = [(len(v), blake3.blake3(v).hexdigest()) for v in iter_chunks(RECORDED_INPUT, params)]
    assert got[: len(first)] == first
    assert len(got) == count


# --- tune ---------------------------------------------------------------------------------


def test_measure_model(tmp_path: Path) -> None:
    one = tmp_path / "a"
    one.write_bytes(seeded(5, 200_000))
    report = measure([[one], [one]], DEFAULT_PARAMS)
    lengths = cut_lengths(one.read_bytes())
    assert report.fragments == 2 * len(lengths)
    assert report.unique_fragments == len(lengths)
    assert report.total_bytes == 400_000 and report.unique_bytes == 200_000
    assert report.dedup_ratio == 2.0
    expected = REFERENCE_BYTES * report.fragments + INDEX_ENTRY_BYTES * report.unique_fragments
    assert report.metadata_bytes == expected
    assert report.overhead == expected / 200_000
    assert (report.size_min, report.size_max) == (min(lengths), max(lengths))
    small = measure([[one], [one]], grid_params(4096))
    assert recommend([small, report]) is min((small, report), key=lambda r: r.stored_bytes)


def _make_versions(root: Path) -> tuple[Path, Path]:
    v1, v2 = root / "v1", root / "v2"
    big = seeded(21, 400_000)
    for version, content in ((v1, big), (v2, big[:150_000] + b"an edit" + big[150_010:])):
        (version / "sub").mkdir(parents=True)
        (version / "big.bin").write_bytes(content)
        (version / "sub" / "same.bin").write_bytes(seeded(22, 50_000))
        (version / "empty").write_bytes(b"")
    (v2 / "sub" / "new.bin").write_bytes(seeded(23, 10_000))
    return v1, v2


def run_chunker(*args: str | Path) -> subprocess.CompletedProcess[str]:
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [sys.executable, "-m", "chunker", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip


def test_tune_cli(tmp_path: Path) -> None:
    v1, v2 = _make_versions(tmp_path)
    plot = tmp_path / "tune.png"
    result = run_chunker("tune", v1, v2, "--avg", "4k,16k,8k", "--plot", plot)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    settings_ = ["1k/4k/16k", "2k/8k/32k", "4k/16k/64k"]  # sorted by average
    rows = [line.split() for line in lines if line.split()[0] in settings_]
    assert [row[0] for row in rows] == settings_
    header = lines[1].split()
    dedup = header.index("dedup")
    for row in rows:
        cells = [cell for cell in row if cell != "*"]
        assert float(cells[dedup]) > 1.5  # v2 is v1 with one edit: nearly everything shared
    assert sum("*" in row for row in rows) == 1
    assert any(line.startswith("recommended: ") and "rule:" in line for line in lines)

    png = plot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert png.endswith(b"IEND\xaeB`\x82")
    assert int.from_bytes(png[16:20], "big") > 100  # width in pixels


def test_tune_cli_json(tmp_path: Path) -> None:
    v1, v2 = _make_versions(tmp_path)
    result = run_chunker("tune", v1, v2, "--avg", "16k", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    [setting] = doc["settings"]
    assert setting["params"] == doc["recommended"] == "4k/16k/64k"
    assert setting["dedup_ratio"] > 1.5
    assert [v["files"] for v in doc["versions"]] == [3, 4]


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["tune", "{tmp}/missing"], "chunker: {tmp}/missing: No such file or directory"),
        (["tune", "{tmp}", "--avg", "4k,3x"], "chunker: --avg 3x: chunk size '3x' must be"),
        (["tune", "{tmp}", "--avg", "64"], "chunker: --avg 64: min_size 16 must be between"),
        (["tune"], "chunker: tune: the following arguments are required: PATH"),
        (["tune", "{tmp}"], "chunker: tune: the versions hold no bytes to chunk"),
        (["tune", "{tmp}", "--plot", "{tmp}/no/dir/x.png"], "chunker: {tmp}/no/dir/x.png: "),
    ],
)
def test_tune_cli_user_errors(tmp_path: Path, args: list[str], start: str) -> None:
    result = run_chunker(*(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(start.format(tmp=tmp_path))
