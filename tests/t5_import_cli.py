"""`annofs import` as a user runs it: the summary line, the progress bar, and errors."""

from __future__ import annotations

import re
from pathlib import Path

from t2_import_export import make_tree
from t5_cli import annofs, dump_store, ok

SUMMARY = re.compile(
    r"^imported (?P<src>\S+) -> (?P<dest>\S+): (?P<files>\d+) files \((?P<read>\d+) read, "
    r"(?P<reused>\d+) unchanged\), \d+ directories, \d+ symlinks, (?P<removed>\d+) removed; "
    r"(?P<bytes>\d+) bytes read, (?P<new>\d+) new bytes stored; [\d.]+ s \(\d+ MB/s\)$")


def summary(out: bytes) -> dict[str, str]:
    lines = out.decode().splitlines()
    assert len(lines) == 1, lines
    m = SUMMARY.match(lines[0])
    assert m, lines[0]
    return m.groupdict()


def test_summary_line_and_progress(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    src = make_tree(tmp_path / "src")
    proc = annofs(store, "import", "--progress", str(src), "/p", cwd=tmp_path)
    first = summary(ok(proc))
    # Every file is read once: make_tree's second hard-link name is linked, not read.
    assert int(first["read"]) == int(first["files"]) - 1 > 0 and first["reused"] == "0"
    assert int(first["new"]) > 0
    # --progress draws the bar although stderr is a pipe: bytes, rate, files.
    bar = proc.stderr.decode()
    assert "import" in bar and "files" in bar and "/s" in bar, bar
    (src / "a.txt").write_bytes(b"changed\n")
    proc = annofs(store, "import", str(src), "/p", cwd=tmp_path)
    second = summary(ok(proc))
    assert second["read"] == "1" and int(second["reused"]) == int(first["read"]) - 1
    assert second["bytes"] == "8" and second["removed"] == "0"
    assert proc.stderr == b""  # no bar unless a terminal or --progress


def test_missing_source_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    before = dump_store(store)
    for args in (["import", str(tmp_path / "nope"), "/x"],
                 ["import", "--progress", str(tmp_path / "nope"), "/x"]):
        proc = annofs(store, *args, cwd=tmp_path)
        assert proc.returncode == 2
        err = proc.stderr.decode()
        assert err.count("\n") == 1 and f"{tmp_path / 'nope'}: no such directory" in err, err
        assert dump_store(store) == before
    (tmp_path / "file").write_bytes(b"x")
    proc = annofs(store, "import", str(tmp_path / "file"), "/x", cwd=tmp_path)
    assert proc.returncode == 2 and b"not a directory" in proc.stderr
    proc = annofs(store, "import", str(tmp_path), "relative/dest", cwd=tmp_path)
    assert proc.returncode == 2 and b"store paths start with '/'" in proc.stderr
    assert dump_store(store) == before
