"""`annofs gc --keep-last N / --keep-within DURATION` as a user runs it: offline on a store,
mounted through the daemon, and bad values (one line, exit 2, nothing changed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import Mount
from t5_cli import BASE_NS, annofs, dump_store, ok, write

CONTENTS = [random.Random(i).randbytes(40_000) for i in range(5)]


def log_ids(store: Path | None, path: str, cwd: Path) -> list[int]:
    """The version ids `annofs log --json` shows, newest first."""
    out = ok(annofs(store, "log", "--json", path, cwd=cwd)).decode()
    return [json.loads(line)["version"] for line in out.splitlines()]


def gc_json(store: Path, *args: str, cwd: Path) -> dict[str, int]:
    return json.loads(ok(annofs(store, "gc", "--json", *args, cwd=cwd)))


@pytest.fixture
def store_with_history(tmp_path: Path) -> Path:
    """A store where /src/p/f has five versions (five imports of a changed file)."""
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    src = tmp_path / "p"
    src.mkdir()
    for i, data in enumerate(CONTENTS):
        write(src / "f", data, BASE_NS + i * 1_000_000_000)
        ok(annofs(store, "import", str(src), "/src/p", cwd=tmp_path))
    return store


def test_offline_keep_last_then_keep_within(store_with_history: Path, tmp_path: Path) -> None:
    store = store_with_history
    ids = log_ids(store, "/src/p/f", tmp_path)
    assert len(ids) == 6 and ids[-1] == 0
    # Everything was made seconds ago: a day's window keeps it all.
    assert gc_json(store, "--keep-within", "1d", cwd=tmp_path)["versions_freed"] == 0
    rep = gc_json(store, "--keep-last", "2", cwd=tmp_path)
    assert rep["versions_freed"] == 3 and rep["bytes_freed"] >= 3 * 40_000
    assert log_ids(store, "/src/p/f", tmp_path) == [ids[0], ids[1], 0]
    assert ok(annofs(store, "cat", f"/src/p/f@{ids[1]}", cwd=tmp_path)) == CONTENTS[3]
    gone = annofs(store, "cat", f"/src/p/f@{ids[2]}", cwd=tmp_path)
    assert gone.returncode == 2 and b"not in this file's history" in gone.stderr
    # The plain form says the same in words, and fsck finds nothing wrong.
    out = ok(annofs(store, "gc", "--keep-last", "1", cwd=tmp_path)).decode()
    assert out.startswith("freed 1 versions, ") and "kept " in out
    assert log_ids(store, "/src/p/f", tmp_path) == [ids[0], 0]
    assert b": ok" in ok(annofs(store, "fsck", cwd=tmp_path))


BAD = {
    "negative": (["--keep-last", "-1"], "--keep-last -1"),
    "zero": (["--keep-last", "0"], "--keep-last 0"),
    "not-a-number": (["--keep-last", "three"], "--keep-last"),
    "unknown-unit": (["--keep-within", "3x"], "--keep-within '3x'"),
    "no-unit": (["--keep-within", "7"], "--keep-within '7'"),
    "zero-duration": (["--keep-within", "0d"], "--keep-within '0d'"),
    "bad-with-good": (["--keep-last", "2", "--keep-within", "1y"], "--keep-within '1y'"),
}


@pytest.mark.parametrize("args,names", BAD.values(), ids=BAD.keys())
def test_bad_values_change_nothing(store_with_history: Path, tmp_path: Path,
                                   args: list[str], names: str) -> None:
    before = dump_store(store_with_history)
    proc = annofs(store_with_history, "gc", *args, cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err, err
    assert proc.stdout == b""
    assert dump_store(store_with_history) == before


def test_mounted_keep_last_and_keep_within(mounted: Mount, tmp_path: Path) -> None:
    f = mounted.path / "f"
    for data in CONTENTS:
        f.write_bytes(data)  # each close stores a version
    ids = log_ids(None, str(f), tmp_path)
    assert len(ids) == 6
    for args, names in (BAD["negative"], BAD["unknown-unit"]):
        proc = annofs(mounted.store, "gc", *args, cwd=tmp_path)
        assert proc.returncode == 2 and names in proc.stderr.decode()
        assert len(proc.stderr.decode().splitlines()) == 1
    assert log_ids(None, str(f), tmp_path) == ids
    assert gc_json(mounted.store, "--keep-within", "1h", cwd=tmp_path)["versions_freed"] == 0
    rep = gc_json(mounted.store, "--keep-last", "3", "--keep-within", "1h", cwd=tmp_path)
    assert rep["versions_freed"] == 0  # the union: the window still keeps every version
    rep = gc_json(mounted.store, "--keep-last", "3", cwd=tmp_path)
    assert rep["versions_freed"] == 2
    assert log_ids(None, str(f), tmp_path) == [*ids[:3], 0]
    assert f.read_bytes() == CONTENTS[-1]
    assert ok(annofs(None, "cat", f"{f}@{ids[2]}", cwd=tmp_path)) == CONTENTS[2]
