"""Real tools on a real mount: git, tar, cp -a, compileall, concurrent writers and
readers. Where it is the clearest oracle, the same operations run on the native disk
and the results must match (commit ids, archives, bytes and metadata).

Each test has a fresh store and daemon; after it, the daemon is stopped and the store
must pass fsck's checker, and the daemon must have logged no warning or error.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Mount
from fuse_helpers import stop_and_check


@pytest.fixture
def mnt(mounted: Mount) -> Iterator[Mount]:
    """A fresh store and daemon; after the test, unmounted and checked by fsck."""
    yield mounted
    stop_and_check(mounted)


# -- a tree with every kind of entry, and a comparable picture of it -------------------------


def make_tree(root: Path, *, special: bool = True) -> None:
    """Files of many sizes, modes, owners and times; symlinks, a hard link, a FIFO,
    xattrs, an empty directory. Deterministic: the same call gives the same tree."""
    rnd = random.Random(42)
    (root / "src" / "pkg" / "sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i in range(40):
        lines = "".join(f"line {j} of file {i}\n" for j in range(i * 7))
        (root / "src" / "pkg" / f"mod{i}.txt").write_text(lines)
    (root / "src" / "pkg" / "sub" / "deep.txt").write_text("deep\n")
    (root / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    (root / "empty").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "secret").write_text("private\n")
    os.chmod(root / "secret", 0o600)
    os.symlink("src/pkg/mod1.txt", root / "link-to-file")
    os.symlink("src/pkg", root / "link-to-dir")
    os.symlink("does/not/exist", root / "dangling")
    os.link(root / "src" / "pkg" / "mod3.txt", root / "hard-link")
    os.setxattr(root / "big.bin", "user.origin", b"test tree")
    os.setxattr(root / "src", "user.dir-note", b"\x00\x01binary")
    if special:
        os.mkfifo(root / "fifo", 0o640)
        os.chown(root / "secret", 1000, 1000)
        os.lchown(root / "dangling", 1234, 5678)
    # Times last, deepest first, so that no later change moves a directory's mtime.
    paths = sorted((p for p in root.rglob("*")), key=lambda p: -len(p.parts))
    for k, p in enumerate(paths):
        t = 1_600_000_000_123_456_789 + k * 1_000_000_001
        os.utime(p, ns=(t, t), follow_symlinks=False)


def picture(root: Path, *, times: bool = True) -> dict[str, tuple]:
    """Everything a copy must keep, per relative path; hard links as groups of names."""
    out: dict[str, tuple] = {}
    first_name: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                k: os.getxattr(p, k) for k in sorted(os.listxattr(p))}
            link_group = None
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                link_group = first_name.setdefault(st.st_ino, rel)
            out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                        None if stat.S_ISDIR(st.st_mode) else st.st_size,
                        st.st_mtime_ns if times else None, content, xattrs, link_group)
    return out


def run(cmd: list[str] | str, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> str:
    """Run a command (a string goes to bash -e); its stdout. Fails the test on error."""
    if isinstance(cmd, str):
        cmd = ["bash", "-euo", "pipefail", "-c", cmd]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stderr}"
    return res.stdout


# -- cp -a -----------------------------------------------------------------------------------


def test_cp_a_in_and_out_keeps_bytes_and_metadata(mnt: Mount, tmp_path: Path) -> None:
    native = tmp_path / "native"
    native.mkdir()
    make_tree(native)
    want = picture(native)
    run(["cp", "-a", str(native), str(mnt.path / "copy")])
    assert picture(mnt.path / "copy") == want
    run(["cp", "-a", str(mnt.path / "copy"), str(tmp_path / "back")])
    assert picture(tmp_path / "back") == want
    # and once more through a remount: what cp -a wrote is what was stored
    mnt.stop()
    mnt.start()
    assert picture(mnt.path / "copy") == want


def test_cp_a_within_the_mount(mnt: Mount, tmp_path: Path) -> None:
    make_tree(mnt.path / "a")
    want = picture(mnt.path / "a")
    run(["cp", "-a", str(mnt.path / "a"), str(mnt.path / "b")])
    assert picture(mnt.path / "b") == want
    (mnt.path / "b" / "big.bin").write_bytes(b"changed")
    assert picture(mnt.path / "a") == want


# -- tar -------------------------------------------------------------------------------------

TAR_CREATE = ["tar", "--format=posix", "--xattrs", "--xattrs-include=user.*", "--sort=name",
              "--numeric-owner", "--pax-option=delete=atime,delete=ctime"]


def test_tar_extract_and_create_round_trip(mnt: Mount, tmp_path: Path) -> None:
    native = tmp_path / "native"
    native.mkdir()
    make_tree(native)
    archive = tmp_path / "native.tar"
    run([*TAR_CREATE, "-cf", str(archive), "-C", str(native), "."])
    dest = mnt.path / "x"
    dest.mkdir()
    run(["tar", "--xattrs", "--xattrs-include=user.*", "--numeric-owner", "-xpf",
         str(archive), "-C", str(dest)])
    assert picture(dest) == picture(native)
    again = tmp_path / "mount.tar"
    run([*TAR_CREATE, "-cf", str(again), "-C", str(dest), "."])
    assert again.read_bytes() == archive.read_bytes()


def test_tar_gzip_pipeline_out_of_the_mount(mnt: Mount, tmp_path: Path) -> None:
    make_tree(mnt.path / "t", special=False)
    out = tmp_path / "out"
    out.mkdir()
    run(f"tar --format=posix --xattrs -C {mnt.path / 't'} -czf - . "
        f"| tar --xattrs --xattrs-include='user.*' -C {out} -xzpf -")
    assert picture(out) == picture(mnt.path / "t")


# -- git ---------------------------------------------------------------------------------------

GIT_SCRIPT = r"""
git init -q -b main .
git add -A
git commit -q -m initial
git checkout -q -b feature
sed -i 's/line 3 /LINE THREE /' src/pkg/mod5.txt
git mv src/pkg/mod6.txt src/pkg/renamed.txt
git rm -q src/pkg/mod7.txt
printf 'new file\n' > src/pkg/new.txt
chmod +x src/pkg/mod8.txt
git add -A
git commit -q -m 'feature work'
git checkout -q main
printf 'main change\n' >> src/pkg/mod9.txt
git commit -q -am 'main work'
git merge -q --no-edit feature
git checkout -q HEAD~1
git checkout -q feature
git checkout -q main
git gc -q
git fsck --strict --full --no-progress
test -z "$(git status --porcelain)"
git rev-parse main feature
git ls-files -s
git cat-file --batch-all-objects --batch-check
"""


def _git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="T",
               GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="T",
               GIT_COMMITTER_EMAIL="t@example.org", GIT_AUTHOR_DATE="2020-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2020-01-01T00:00:00Z", LC_ALL="C")
    return env


def test_git_repository_matches_the_native_one(mnt: Mount, tmp_path: Path) -> None:
    env = _git_env(tmp_path)
    results = {}
    for name, root in (("native", tmp_path / "repo"), ("mount", mnt.path / "repo")):
        root.mkdir()
        make_tree(root, special=False)
        results[name] = run(GIT_SCRIPT, cwd=root, env=env)
    assert results["mount"] == results["native"]
    ours = picture(mnt.path / "repo", times=False)
    theirs = picture(tmp_path / "repo", times=False)
    assert {k: v for k, v in ours.items() if not k.startswith(".git")} \
        == {k: v for k, v in theirs.items() if not k.startswith(".git")}
    # the repository is still sound after a remount
    mnt.stop()
    mnt.start()
    run("git fsck --strict --full --no-progress && test -z \"$(git status --porcelain)\"",
        cwd=mnt.path / "repo", env=env)


def test_git_local_clone_shares_objects_by_hard_links(mnt: Mount, tmp_path: Path) -> None:
    env = _git_env(tmp_path)
    repo = mnt.path / "repo"
    repo.mkdir()
    make_tree(repo, special=False)
    run("git init -q -b main . && git add -A && git commit -q -m one", cwd=repo, env=env)
    run(["git", "clone", "-q", str(repo), str(mnt.path / "clone")], env=env)
    objects = [p for p in (mnt.path / "clone" / ".git" / "objects").rglob("*") if p.is_file()]
    linked = [p for p in objects if p.stat().st_nlink == 2]
    assert len(linked) > 40  # a local clone links the loose objects, across directories
    run("echo more >> run.sh && git commit -q -am two && git gc -q && "
        "git fsck --strict --full --no-progress", cwd=mnt.path / "clone", env=env)
    shutil.rmtree(repo)  # the clone's links keep the objects
    out = run("git fsck --strict --full --no-progress && git log --oneline | wc -l",
              cwd=mnt.path / "clone", env=env)
    assert out.split() == ["2"]


# -- python -m compileall ------------------------------------------------------------------------


def _python_package(root: Path) -> None:
    pkg = root / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 41\n")
    (pkg / "sub" / "__init__.py").write_text("")
    for i in range(30):
        (pkg / f"m{i}.py").write_text(
            f"from pkg import VALUE\n\n\ndef f{i}():\n    return VALUE + {i}\n" * 3)
    (pkg / "sub" / "deep.py").write_text("def answer():\n    return 42\n")
    for p in pkg.rglob("*.py"):
        os.utime(p, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))


def test_compileall_writes_the_same_bytecode_as_on_disk(mnt: Mount, tmp_path: Path) -> None:
    native = tmp_path / "native"
    native.mkdir()
    _python_package(native)
    run(["cp", "-a", str(native / "pkg"), str(mnt.path / "pkg")])
    for root in (native, mnt.path):
        run([sys.executable, "-m", "compileall", "-q", "-d", "pkg", str(root / "pkg")],
            cwd=root)
    pycs = sorted(p.relative_to(native) for p in native.rglob("*.pyc"))
    assert len(pycs) == 33
    assert sorted(p.relative_to(mnt.path) for p in mnt.path.rglob("*.pyc")) == pycs
    for p in pycs:
        assert (mnt.path / p).read_bytes() == (native / p).read_bytes(), p
    out = run([sys.executable, "-c",
               "import pkg.m7, pkg.sub.deep; print(pkg.m7.f7(), pkg.sub.deep.answer(), "
               "pkg.m7.__cached__)"],
              cwd=mnt.path, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    value, answer, cached = out.split()
    assert (value, answer) == ("48", "42") and Path(cached).exists()


# -- concurrency --------------------------------------------------------------------------------


def _run_concurrently(writer: Callable[[], None], reader: Callable[[], int],
                      n_readers: int) -> list[int]:
    """Run one writer and n readers (each reads until the writer is done); reads per
    reader. Any exception in a thread fails the test."""
    done = threading.Event()

    def read_until_done() -> int:
        n = 0
        while not done.is_set():
            n += reader()
        return n + reader()

    def write_then_signal() -> None:
        try:
            writer()
        finally:
            done.set()

    with ThreadPoolExecutor(n_readers + 1) as pool:
        readers = [pool.submit(read_until_done) for _ in range(n_readers)]
        w = pool.submit(write_then_signal)
        w.result()
        return [r.result() for r in readers]


def _record(i: int) -> bytes:
    body = hashlib.sha256(str(i).encode()).hexdigest().encode() * (1 + i % 50)
    return b"%08d:" % i + body + b"\n"


def test_appending_writer_and_concurrent_readers(mnt: Mount) -> None:
    f = mnt.path / "log"
    records = [_record(i) for i in range(3000)]
    stream = b"".join(records)
    f.write_bytes(b"")

    def writer() -> None:
        fd = os.open(f, os.O_WRONLY | os.O_APPEND)
        try:
            for i, r in enumerate(records):
                os.write(fd, r)
                if i % 300 == 299:
                    os.fsync(fd)  # commits while readers read
        finally:
            os.close(fd)

    def reader() -> int:
        data = f.read_bytes()
        assert stream.startswith(data), f"a reader saw bytes that were never written " \
                                        f"(at {len(data)} bytes)"
        return 1

    reads = _run_concurrently(writer, reader, n_readers=4)
    assert all(n >= 1 for n in reads)
    assert f.read_bytes() == stream


def _generation(k: int) -> bytes:
    rnd = random.Random(k)
    return b"generation %06d\n" % k + rnd.randbytes(rnd.randrange(1_000, 300_000))


def test_atomic_replace_while_readers_read(mnt: Mount) -> None:
    # The write-to-temporary-then-rename pattern of editors, package managers and git:
    # a reader sees one whole generation, never a mix or a torn file.
    target = mnt.path / "current"
    target.write_bytes(_generation(0))
    seen: set[int] = set()

    def writer() -> None:
        for k in range(1, 120):
            tmp = mnt.path / f".tmp-{k}"
            with open(tmp, "wb") as w:
                w.write(_generation(k))
            os.rename(tmp, target)

    def reader() -> int:
        data = target.read_bytes()
        k = int(data[11:17])
        assert data == _generation(k), f"generation {k} read torn or mixed"
        seen.add(k)
        return 1

    _run_concurrently(writer, reader, n_readers=3)
    assert target.read_bytes() == _generation(119)
    assert len(seen) > 1
    assert sorted(os.listdir(mnt.path)) == ["current"]


def test_parallel_writers_of_separate_files(mnt: Mount, tmp_path: Path) -> None:
    def write_tree(n: int) -> None:
        d = mnt.path / f"w{n}"
        d.mkdir()
        rnd = random.Random(n)
        for i in range(60):
            (d / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(0, 100_000)))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write_tree, range(4)))
    for n in range(4):
        rnd = random.Random(n)
        for i in range(60):
            assert (mnt.path / f"w{n}" / f"f{i}").read_bytes() \
                == rnd.randbytes(rnd.randrange(0, 100_000))
    shutil.rmtree(mnt.path / "w0")
    assert sorted(os.listdir(mnt.path)) == ["w1", "w2", "w3"]


# -- make and a C compiler -----------------------------------------------------------------------

MAKEFILE = """\
app: main.o util.o
\t$(CC) -o $@ main.o util.o
%.o: %.c util.h
\t$(CC) -O1 -c -o $@ $<
"""
MAIN_C = '#include <stdio.h>\n#include "util.h"\nint main(void) { printf("%d\\n", f(20)); }\n'
UTIL_H = "int f(int x);\n"


def _c_project(root: Path) -> None:
    (root / "Makefile").write_text(MAKEFILE)
    (root / "main.c").write_text(MAIN_C)
    (root / "util.h").write_text(UTIL_H)
    (root / "util.c").write_text('#include "util.h"\nint f(int x) { return x + 22; }\n')
    old = 1_600_000_000 * 10**9
    for p in root.iterdir():
        os.utime(p, ns=(old, old))


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                    reason="needs make and a C compiler")
def test_make_builds_runs_and_rebuilds_only_what_changed(mnt: Mount, tmp_path: Path) -> None:
    src = mnt.path / "proj"
    src.mkdir()
    native = tmp_path / "proj"
    native.mkdir()
    for root in (src, native):
        _c_project(root)
        run(["make", "-s"], cwd=root)
    assert run([str(src / "app")]) == "42\n"  # executed from the mount
    for name in ("main.o", "util.o", "app"):
        assert (src / name).read_bytes() == (native / name).read_bytes(), name
    assert subprocess.run(["make", "-q"], cwd=src).returncode == 0  # up to date
    (src / "util.c").write_text('#include "util.h"\nint f(int x) { return x * 2; }\n')
    rebuilt = run(["make"], cwd=src)
    assert "util.c" in rebuilt and "main.c" not in rebuilt  # make trusts the mtimes
    assert run([str(src / "app")]) == "40\n"
