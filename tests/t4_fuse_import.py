"""`annofs import` into a live mount: the command fills a staging tree beside the daemon,
the daemon swaps it in, and the kernel shows the result at once (no stale names, sizes or
pages, even for paths it had cached)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import Mount, annofs_cmd
from fuse_helpers import store_problems
from host_reads import HostReads

from annofs.store.lock import import_lease


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(annofs_cmd(*args), capture_output=True, text=True, check=check)


def make_src(root: Path) -> Path:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("first\n")
    (root / "sub" / "b.txt").write_text("b\n" * 1000)
    (root / "sub" / "deep" / "c.bin").write_bytes(os.urandom(300_000))
    (root / "gone.txt").write_text("removed later\n")
    os.symlink("a.txt", root / "link")
    return root


def test_import_into_the_mount_shows_at_once(mounted: Mount, tmp_path: Path) -> None:
    src = make_src(tmp_path / "src")
    dest = mounted.path / "proj" / "src"
    out = run("import", str(src), str(dest)).stdout
    assert "4 files (4 read, 0 unchanged)" in out, out
    assert sorted(os.listdir(dest)) == ["a.txt", "gone.txt", "link", "sub"]
    assert (dest / "sub" / "deep" / "c.bin").read_bytes() == \
        (src / "sub" / "deep" / "c.bin").read_bytes()
    assert os.readlink(dest / "link") == "a.txt"
    # The kernel now caches names, attributes and pages; a re-import must replace them.
    assert (dest / "a.txt").read_text() == "first\n"
    (src / "a.txt").write_text("second, longer\n")
    (src / "gone.txt").unlink()
    (src / "sub" / "new.txt").write_text("new\n")
    watch = HostReads(src)
    try:
        out = run("import", str(src), str(dest)).stdout
        assert sorted(watch.read_paths()) == [str(src / "a.txt"), str(src / "sub" / "new.txt")]
    finally:
        watch.close()
    assert "(2 read, 2 unchanged)" in out and "1 removed" in out, out
    assert (dest / "a.txt").read_text() == "second, longer\n"
    assert (dest / "a.txt").stat().st_size == len("second, longer\n")
    assert not (dest / "gone.txt").exists()
    assert (dest / "sub" / "new.txt").read_text() == "new\n"
    # The import is a tree like any other in the mount: writable, copyable.
    (dest / "sub" / "b.txt").write_text("edited in the mount\n")
    assert (src / "sub" / "b.txt").read_text() == "b\n" * 1000
    run("cp", str(dest), str(mounted.path / "copy"))
    assert (mounted.path / "copy" / "sub" / "b.txt").read_text() == "edited in the mount\n"
    # A re-import makes the destination the host tree again (the edit goes).
    run("import", str(src), str(dest))
    assert (dest / "sub" / "b.txt").read_text() == "b\n" * 1000
    mounted.stop()
    assert store_problems(mounted.store) == []


def test_gc_under_the_mount_waits_for_imports(mounted: Mount) -> None:
    """gc would take an import's staged tree and fragments for garbage: it is refused
    while any import holds its lease (here: this test process)."""
    (mounted.path / "f").write_text("x")
    with import_lease(mounted.store):
        res = run("--store", str(mounted.store), "gc", check=False)
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "an import is running" in res.stderr
    assert run("--store", str(mounted.store), "gc").returncode == 0


def test_import_errors_through_the_mount(mounted: Mount, tmp_path: Path) -> None:
    res = run("import", str(tmp_path / "missing"), str(mounted.path / "x"), check=False)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "missing: no such directory" in res.stderr
    src = make_src(tmp_path / "src")
    (mounted.path / "file").write_text("a file\n")
    res = run("import", str(src), str(mounted.path / "file" / "below"), check=False)
    assert res.returncode == 2 and "not a directory" in res.stderr, res
    res = run("--store", str(mounted.store), "import", str(src), "/x", check=False)
    assert res.returncode == 2 and "mounted at" in res.stderr
    assert sorted(os.listdir(mounted.path)) == ["file"]
