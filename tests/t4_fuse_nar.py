"""`annofs nar` on a live mount: a restore into the mount is made by the daemon and shows
at once; the real Nix dumps it through the mount to the same archive; a bad archive adds
nothing; `nar hash` of a path in the mount equals `nix-hash` of it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import Mount, annofs_cmd
from nar_cases import GOOD
from t2_nar import make_tree, nix


def run(*args: str, check: bool = True, stdin: bytes | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run(annofs_cmd(*args), capture_output=True, input=stdin, timeout=120)
    if check:
        assert res.returncode == 0, res.stderr.decode()
    return res


def test_restore_into_the_mount_shows_at_once(mounted: Mount, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", big=2 << 20)
    nix_dump = nix("nix-store", "--dump", str(tree))
    (tmp_path / "t.nar").write_bytes(nix_dump)
    assert not (mounted.path / "nix").exists()  # the kernel now caches "no such entry"
    dest = mounted.path / "nix" / "store" / "abc-tree"
    out = run("nar", "restore", str(tmp_path / "t.nar"), str(dest)).stdout.decode()
    assert out.startswith(f"restored {tmp_path / 't.nar'} -> {dest}: 13 files")
    assert sorted(os.listdir(mounted.path / "nix" / "store")) == ["abc-tree"]
    assert nix("nix-store", "--dump", str(dest)) == nix_dump  # the real Nix, through FUSE
    want = nix("nix-hash", "--type", "sha256", "--base32", str(tree)).decode().strip()
    assert nix("nix-hash", "--type", "sha256", "--base32", str(dest)).decode().strip() == want
    assert run("nar", "hash", str(dest)).stdout.decode() == f"sha256:{want}\n"
    assert run("nar", "dump", str(dest)).stdout == nix_dump
    # From stdin (the client spools it for the daemon).
    run("nar", "restore", "-", str(mounted.path / "from-stdin"), stdin=GOOD)
    assert (mounted.path / "from-stdin" / "a").read_bytes() == b"hello"
    assert os.readlink(mounted.path / "from-stdin" / "b" / "c") == "../a"
    assert os.access(mounted.path / "from-stdin" / "x", os.X_OK)


def test_bad_nar_into_the_mount_adds_nothing(mounted: Mount, tmp_path: Path) -> None:
    (tmp_path / "bad.nar").write_bytes(GOOD + b"junk")
    for args, stdin in (((str(tmp_path / "bad.nar"),), None), (("-",), GOOD[:-3])):
        res = run("nar", "restore", *args, str(mounted.path / "new"), check=False, stdin=stdin)
        err = res.stderr.decode()
        assert res.returncode == 2 and err.count("\n") == 1, err
        assert ("trailing bytes" in err) if stdin is None else ("truncated" in err)
        assert os.listdir(mounted.path) == []
    (mounted.path / "exists").mkdir()
    res = run("nar", "restore", "-", str(mounted.path / "exists"), check=False, stdin=GOOD)
    assert res.returncode == 2 and b"already exists" in res.stderr
    assert os.listdir(mounted.path / "exists") == []
    # Offline restores into a mounted store are refused: the daemon owns it.
    res = run("--store", str(mounted.store), "nar", "restore", "-", "/offline", check=False,
              stdin=GOOD)
    assert res.returncode == 2 and b"mounted at" in res.stderr
    assert sorted(os.listdir(mounted.path)) == ["exists"]
