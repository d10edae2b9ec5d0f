"""The `annofs` command as a user runs it: a subprocess, exit statuses, stdout and stderr.

SPEC §3: exit 0 on success, 2 on bad usage or bad input with exactly one line on stderr
naming the thing and the problem, and nothing in the store changed (checked against a
dump of every LMDB key and value).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import lmdb
import pytest
from t2_import_export import host_tree, make_tree

BASE_NS = 1_700_000_000_000_000_000


def annofs(store: Path | None, *args: str, cwd: Path | None = None
           ) -> subprocess.CompletedProcess[bytes]:
    """Run the command with `--store` (unless None), in a clean environment."""
    env = {k: v for k, v in os.environ.items() if k != "ANNOFS_STORE"}
    env["XDG_DATA_HOME"] = str((cwd or Path.cwd()) / "no-default-store")
    cmd = [sys.executable, "-m", "annofs.cli.main"]
    if store is not None:
        cmd += ["--store", str(store)]
    return subprocess.run([*cmd, *args], capture_output=True, env=env, cwd=cwd, timeout=60)


def ok(proc: subprocess.CompletedProcess[bytes]) -> bytes:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.decode()}"
    return proc.stdout


def dump_store(store: Path) -> dict[tuple[bytes, bytes], bytes]:
    """Every key and value of every named database (and the main one that lists them)."""
    env = lmdb.open(str(store / "db"), readonly=True, lock=False, max_dbs=64, subdir=True)
    out: dict[tuple[bytes, bytes], bytes] = {}
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
        for name in names:
            db = env.open_db(name, create=False)
            with env.begin(db=db) as txn:
                for k, v in txn.cursor():
                    out[(name, bytes(k))] = bytes(v)
    finally:
        env.close()
    return out


def write(path: Path, data: bytes, t: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(t, t))


# -- happy paths ---------------------------------------------------------------------------


def test_init_is_idempotent(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = ok(annofs(store, "init", cwd=tmp_path))
    assert str(store).encode() in out
    first = dump_store(store)
    assert first
    ok(annofs(store, "init", cwd=tmp_path))
    assert dump_store(store) == first


def test_import_export_round_trip(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    src = make_tree(tmp_path / "src")
    out = ok(annofs(store, "import", str(src), "/src/tree", cwd=tmp_path)).decode()
    assert re.search(r"imported .* -> /src/tree: \d+ files", out), out
    ok(annofs(store, "export", "/src/tree", str(tmp_path / "out"), cwd=tmp_path))
    assert host_tree(tmp_path / "out") == host_tree(src)
    # The second import reads nothing and says so.
    out = ok(annofs(store, "import", str(src), "/src/tree", cwd=tmp_path)).decode()
    assert "(0 read," in out and "0 bytes read" in out, out


def test_import_with_exclude(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    src = make_tree(tmp_path / "src")
    ok(annofs(store, "import", "--exclude", "*.bin", "--exclude", "sub", str(src), "/s",
              cwd=tmp_path))
    ok(annofs(store, "export", "/s", str(tmp_path / "out"), cwd=tmp_path))
    names = set(os.listdir(tmp_path / "out"))
    assert "a.txt" in names and "big.bin" not in names and "sub" not in names


def test_log_cat_diff(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    src = tmp_path / "proj"
    src.mkdir()
    contents = [b"line1\nline2\nline3\n", b"line1\nCHANGED\nline3\n",
                b"line1\nCHANGED\nline3\nline4\n"]
    for i, data in enumerate(contents):
        write(src / "f.txt", data, BASE_NS + i * 1_000_000_000)
        ok(annofs(store, "import", str(src), "/src/proj", cwd=tmp_path))

    lines = ok(annofs(store, "log", "/src/proj/f.txt", cwd=tmp_path)).decode().splitlines()
    assert lines[0].split()[:2] == ["VERSION", "TIME"], lines  # the header
    lines = lines[1:]
    assert len(lines) == 4, lines
    ids = [int(line.split()[0]) for line in lines]
    assert ids[-1] == 0 and ids == sorted(ids, reverse=True), lines
    for line, data in zip(lines, [*reversed(contents), b""], strict=True):
        assert f"blake3:{blake3.blake3(data).hexdigest()}" in line, line
        assert re.search(rf"\s{len(data)}\s", line), line

    newest, middle, oldest = ids[:3]
    assert ok(annofs(store, "cat", f"/src/proj/f.txt@{oldest}", cwd=tmp_path)) == contents[0]
    assert ok(annofs(store, "cat", f"/src/proj/f.txt@{middle}", cwd=tmp_path)) == contents[1]
    assert ok(annofs(store, "cat", "/src/proj/f.txt", cwd=tmp_path)) == contents[2]
    assert ok(annofs(store, "cat", "/src/proj/f.txt@0", cwd=tmp_path)) == b""

    diff = ok(annofs(store, "diff", f"/src/proj/f.txt@{oldest}", f"/src/proj/f.txt@{middle}",
                     cwd=tmp_path)).decode()
    assert "-line2\n" in diff and "+CHANGED\n" in diff
    assert f"/src/proj/f.txt@{oldest}" in diff and f"/src/proj/f.txt@{middle}" in diff
    assert "line4" not in diff
    diff = ok(annofs(store, "diff", f"/src/proj/f.txt@{middle}", "/src/proj/f.txt",
                     cwd=tmp_path)).decode()
    assert "+line4\n" in diff and "-CHANGED" not in diff
    assert ok(annofs(store, "diff", "/src/proj/f.txt", f"/src/proj/f.txt@{newest}",
                     cwd=tmp_path)) == b""


def test_store_from_environment(tmp_path: Path) -> None:
    store = tmp_path / "envstore"
    env = {**os.environ, "ANNOFS_STORE": str(store)}
    proc = subprocess.run([sys.executable, "-m", "annofs.cli.main", "init"], env=env,
                          capture_output=True, timeout=60)
    ok(proc)
    assert (store / "db" / "data.mdb").exists()


# -- user errors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Populated:
    store: Path
    tmp: Path


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Populated:
    """A store with /src/p (a file f with two versions, a directory d) for the error cases."""
    tmp = tmp_path_factory.mktemp("cli")
    store = tmp / "store"
    ok(annofs(store, "init", cwd=tmp))
    src = tmp / "p"
    (src / "d").mkdir(parents=True)
    write(src / "f", b"one\n", BASE_NS)
    ok(annofs(store, "import", str(src), "/src/p", cwd=tmp))
    write(src / "f", b"two\n", BASE_NS + 10**9)
    ok(annofs(store, "import", str(src), "/src/p", cwd=tmp))
    (tmp / "a-file").write_bytes(b"not a directory")
    (tmp / "exists").mkdir()
    return Populated(store, tmp)


@dataclass(frozen=True)
class Case:
    args: Callable[[Populated], list[str]]
    names: Callable[[Populated], str]  # what the one line must mention
    store: Callable[[Populated], Path | None] = lambda p: p.store


ERRORS = {
    "missing-store": Case(lambda p: ["cat", "/src/p/f"], lambda p: str(p.tmp / "nostore"),
                          store=lambda p: p.tmp / "nostore"),
    "import-missing-dir": Case(lambda p: ["import", str(p.tmp / "missing"), "/src/m"],
                               lambda p: str(p.tmp / "missing")),
    "import-a-file": Case(lambda p: ["import", str(p.tmp / "a-file"), "/src/m"],
                          lambda p: str(p.tmp / "a-file")),
    "import-relative-dest": Case(lambda p: ["import", str(p.tmp / "p"), "src/m"],
                                 lambda p: "src/m"),
    "import-dotdot-dest": Case(lambda p: ["import", str(p.tmp / "p"), "/src/../m"],
                               lambda p: "/src/../m"),
    "import-to-root": Case(lambda p: ["import", str(p.tmp / "p"), "/"], lambda p: "root"),
    "import-name-too-long": Case(lambda p: ["import", str(p.tmp / "p"), "/src/" + "n" * 300],
                                 lambda p: "n" * 40),
    "store-is-a-file": Case(lambda p: ["cat", "/src/p/f"], lambda p: str(p.tmp / "a-file"),
                            store=lambda p: p.tmp / "a-file"),
    "export-parent-missing": Case(lambda p: ["export", "/src/p", str(p.tmp / "no" / "out")],
                                  lambda p: str(p.tmp / "no")),
    "cat-relative-path": Case(lambda p: ["cat", "src/p/f"], lambda p: "src/p/f"),
    "cat-dotdot-path": Case(lambda p: ["cat", "/src/p/../p/f"], lambda p: "/src/p/../p/f"),
    "export-to-existing": Case(lambda p: ["export", "/src/p", str(p.tmp / "exists")],
                               lambda p: str(p.tmp / "exists")),
    "export-missing-src": Case(lambda p: ["export", "/src/nope", str(p.tmp / "new-out")],
                               lambda p: "/src/nope"),
    "cat-missing": Case(lambda p: ["cat", "/src/p/nope"], lambda p: "/src/p/nope"),
    "cat-directory": Case(lambda p: ["cat", "/src/p/d"], lambda p: "/src/p/d"),
    "cat-version-not-in-history": Case(lambda p: ["cat", "/src/p/f@999"],
                                       lambda p: "/src/p/f@999"),
    "log-directory": Case(lambda p: ["log", "/src/p"], lambda p: "/src/p"),
    "diff-missing": Case(lambda p: ["diff", "/src/p/f", "/src/p/nope"],
                         lambda p: "/src/p/nope"),
    "unknown-command": Case(lambda p: ["frobnicate"], lambda p: "frobnicate"),
    "unknown-option": Case(lambda p: ["import", "--frobnicate", "x", "/y"],
                           lambda p: "--frobnicate"),
    "missing-argument": Case(lambda p: ["cat"], lambda p: "PATH"),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_user_error(populated: Populated, case: Case) -> None:
    before = dump_store(populated.store)
    store = case.store(populated)
    proc = annofs(store, *case.args(populated), cwd=populated.tmp)
    err = proc.stderr.decode()
    if proc.returncode != 2:
        pytest.fail(f"exit {proc.returncode}, stderr: {err!r}")
    if len(err.splitlines()) != 1 or not err.endswith("\n"):
        pytest.fail(f"not exactly one line on stderr: {err!r}")
    if case.names(populated) not in err:
        pytest.fail(f"the error does not name {case.names(populated)!r}: {err!r}")
    assert "Traceback" not in err
    assert proc.stdout == b""
    assert dump_store(populated.store) == before, "a failed command changed the store"
    if store is not None and store.name == "nostore":
        assert not store.exists(), "a missing store was created"
    assert not (populated.tmp / "new-out").exists()
    assert (populated.tmp / "a-file").read_bytes() == b"not a directory"


def test_a_clone_whose_c_module_is_not_built_says_so_in_one_line(tmp_path: Path) -> None:
    """annofs imported from a copy without csrc/'s module built (a clone used without
    scripts/setup.sh): one line saying what to run, exit 2, nothing made."""
    import shutil

    import annofs as package
    import chunker

    for pkg in (package, chunker):
        src = Path(pkg.__file__).parent
        shutil.copytree(src, tmp_path / src.name,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("ANNOFS_STORE", None)
    proc = subprocess.run([sys.executable, "-m", "annofs.cli.main", "--store",
                           str(tmp_path / "store"), "init"], capture_output=True, env=env,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("annofs: annofs.content._hashcheck is not built ("), lines
    assert lines[0].endswith("run scripts/setup.sh, or pip install -e . in the clone")
    assert not (tmp_path / "store").exists()


def test_log_and_diff_of_a_huge_sparse_file(tmp_path: Path) -> None:
    """A 1 TiB sparse file imports at once; log says it is too large to hash (it has no
    digest, so it cannot be signed) instead of failing; diff refuses it in one line."""
    store = tmp_path / "store"
    ok(annofs(store, "init", cwd=tmp_path))
    src = tmp_path / "proj"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.truncate(1 << 40)
    ok(annofs(store, "import", str(src), "/p", cwd=tmp_path))
    header, *lines = ok(annofs(store, "log", "/p/sparse", cwd=tmp_path)).decode().splitlines()
    assert header.split()[0] == "VERSION"
    assert len(lines) == 2 and "too large to hash" in lines[0] and str(1 << 40) in lines[0]
    proc = annofs(store, "diff", "/p/sparse@0", "/p/sparse", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [
        f"annofs: /p/sparse: {1 << 40} bytes, too large to diff (at most {1 << 30} bytes)"]
