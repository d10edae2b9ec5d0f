"""`annofs nar dump|hash|restore` as a user runs them, against the real Nix; every bad
input exits 2 with one line on stderr and leaves every LMDB key and value as it was."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from nar_cases import GOOD, MALFORMED
from t2_nar import make_tree, nix
from t5_cli import annofs, dump_store, ok


@pytest.fixture
def store(tmp_path: Path) -> Path:
    s = tmp_path / "store"
    ok(annofs(s, "init"))
    return s


def refused(proc: subprocess.CompletedProcess[bytes], fragment: str) -> str:
    """The one stderr line of an exit-2 refusal, which must contain `fragment`."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, f"exit {proc.returncode}: {err}"
    assert err.count("\n") == 1 and err.startswith("annofs: "), err
    assert fragment in err, err
    return err


def test_dump_hash_restore_agree_with_nix(tmp_path: Path, store: Path) -> None:
    tree = make_tree(tmp_path / "tree", big=2 << 20)
    nix_dump = nix("nix-store", "--dump", str(tree))
    nix_b32 = nix("nix-hash", "--type", "sha256", "--base32", str(tree)).decode().strip()
    nix_hash = "sha256:" + nix_b32
    ok(annofs(store, "import", str(tree), "/src/tree"))
    assert ok(annofs(store, "nar", "dump", "/src/tree")) == nix_dump
    assert ok(annofs(store, "nar", "hash", "/src/tree")).decode() == nix_hash + "\n"
    assert ok(annofs(store, "nar", "hash", "--host", str(tree))).decode() == nix_hash + "\n"
    assert ok(annofs(store, "nar", "dump", "--host", str(tree))) == nix_dump
    # nix-store --dump | annofs nar restore - DEST, then dump again.
    env = {k: v for k, v in os.environ.items() if k != "ANNOFS_STORE"}
    cmd = [sys.executable, "-m", "annofs.cli.main", "--store", str(store), "nar", "restore",
           "-", "/nix/store/abc-tree"]
    with subprocess.Popen(["nix-store", "--dump", str(tree)], stdout=subprocess.PIPE) as p:
        res = subprocess.run(cmd, stdin=p.stdout, capture_output=True, env=env, timeout=60)
    out = ok(res).decode()
    assert out.startswith("restored stdin -> /nix/store/abc-tree: ") and nix_hash in out
    assert ok(annofs(store, "nar", "dump", "/nix/store/abc-tree")) == nix_dump
    # From a file; a single-file NAR; several hashes in one call.
    (tmp_path / "f.nar").write_bytes(nix("nix-store", "--dump", str(tree / "hello.txt")))
    ok(annofs(store, "nar", "restore", str(tmp_path / "f.nar"), "/one"))
    one = nix("nix-hash", "--type", "sha256", "--base32", str(tree / "hello.txt")).decode()
    lines = ok(annofs(store, "nar", "hash", "/one", "/src/tree")).decode().splitlines()
    assert lines == ["sha256:" + one.strip(), nix_hash]


def test_restore_host(tmp_path: Path, store: Path) -> None:
    (tmp_path / "good.nar").write_bytes(GOOD)
    ok(annofs(store, "nar", "restore", "--host", str(tmp_path / "good.nar"), str(tmp_path / "o")))
    assert nix("nix-store", "--dump", str(tmp_path / "o")) == GOOD
    (tmp_path / "bad.nar").write_bytes(GOOD + b"x")
    refused(annofs(store, "nar", "restore", "--host", str(tmp_path / "bad.nar"),
                   str(tmp_path / "p")), "trailing bytes")
    assert not (tmp_path / "p").exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.nar", "good.nar", "o", "store"]


BAD = [c for c in MALFORMED if c[0] in ("dotdot", "slash", "duplicate", "unsorted", "trailing",
                                        "truncated-contents", "padding-in-name", "empty")]


@pytest.mark.parametrize(("case", "data", "message"), BAD, ids=[c[0] for c in BAD])
def test_restore_of_a_bad_nar_exits_2_and_changes_nothing(tmp_path: Path, store: Path,
                                                         case: str, data: bytes,
                                                         message: str) -> None:
    (tmp_path / "bad.nar").write_bytes(data)
    before = dump_store(store)
    err = refused(annofs(store, "nar", "restore", str(tmp_path / "bad.nar"), "/nix/store/x"),
                  message)
    assert err.startswith(f"annofs: {tmp_path / 'bad.nar'}: byte ")
    assert dump_store(store) == before
    res = subprocess.run([sys.executable, "-m", "annofs.cli.main", "--store", str(store), "nar",
                          "restore", "-", "/nix/store/x"], input=data, capture_output=True,
                         timeout=60)
    assert refused(res, message).startswith("annofs: stdin: byte ")
    assert dump_store(store) == before


def test_usage_errors(tmp_path: Path, store: Path) -> None:
    (tmp_path / "good.nar").write_bytes(GOOD)
    ok(annofs(store, "nar", "restore", str(tmp_path / "good.nar"), "/t"))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir" / "fifo")
    ok(annofs(store, "import", str(tmp_path / "dir"), "/withfifo"))
    before = dump_store(store)
    refused(annofs(store, "nar", "restore", str(tmp_path / "good.nar"), "/t"), "/t: already exists")
    refused(annofs(store, "nar", "restore", str(tmp_path / "missing.nar"), "/u"),
            "missing.nar: No such file")
    refused(annofs(store, "nar", "restore", str(tmp_path / "good.nar"), "/t/a/b"),
            "/t/a: not a directory")
    refused(annofs(store, "nar", "restore", str(tmp_path / "good.nar"), "relative"),
            "store paths start with '/'")
    refused(annofs(store, "nar", "dump", "/nope"), "/nope: no such file or directory")
    refused(annofs(store, "nar", "hash", str(tmp_path)), "use --host")
    refused(annofs(store, "nar", "hash", "--host", str(tmp_path / "nope")), "no such file")
    refused(annofs(store, "nar", "hash", "/withfifo"), "/withfifo/fifo: a FIFO cannot be put")
    refused(annofs(store, "nar", "hash", "--host", str(tmp_path / "dir")), "a FIFO cannot be put")
    assert dump_store(store) == before


def test_dump_refuses_a_terminal(store: Path, tmp_path: Path) -> None:
    (tmp_path / "good.nar").write_bytes(GOOD)
    ok(annofs(store, "nar", "restore", str(tmp_path / "good.nar"), "/t"))
    master, slave = pty.openpty()
    try:
        res = subprocess.run([sys.executable, "-m", "annofs.cli.main", "--store", str(store),
                              "nar", "dump", "/t"], stdout=slave, stderr=subprocess.PIPE,
                             timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert res.returncode == 2 and b"stdout is a terminal" in res.stderr


def test_restore_refuses_a_terminal_on_stdin(store: Path) -> None:
    master, slave = pty.openpty()
    try:
        res = subprocess.run([sys.executable, "-m", "annofs.cli.main", "--store", str(store),
                              "nar", "restore", "-", "/t"], stdin=slave, capture_output=True,
                             timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert refused(res, "stdin is a terminal")
