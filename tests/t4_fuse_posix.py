"""POSIX semantics through a real mount: one behaviour per test, exact errno values.

Two kinds of test. Most run in their own fresh directory of one mount shared by this
module (`d`; started with --allow-other so other users can be tried): after each, the
store must pass fsck's checker in a read snapshot taken while the daemon runs (every
handle is closed by then, so everything is committed), and the daemon must have
logged nothing; at the end of the module the daemon is stopped and the store checked
again. Tests that remount, count the daemon's work or damage the store get a fresh
store and daemon of their own (`mnt`: conftest's `mounted`, checked after stopping).
A fresh mount per test would cost ~0.7 s each, ~70 s for this module alone.

Other users are a forked child that drops to uid/gid 65534 (fuse_helpers.as_user);
it reaches the mount through directory descriptors, as pytest's tmp_path is private.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import random
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pyfuse3
import pytest
from conftest import Mount
from fuse_helpers import (
    NOBODY,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    annofs,
    as_user,
    errno_of,
    new_mount,
    renameat2,
    run_as,
    stats,
    stop_and_check,
    store_problems,
)

from annofs.volume import Volume

# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def mnt(mounted: Mount) -> Iterator[Mount]:
    """A fresh store and daemon; after the test, unmounted and checked by fsck."""
    yield mounted
    stop_and_check(mounted)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount (--allow-other) for the tests of this module that need no mount of their
    own; stopped, log-checked and fsck-checked at the end."""
    m = new_mount(tmp_path_factory.mktemp("shared"), "--allow-other")
    try:
        yield m
    finally:
        stop_and_check(m)
    assert not m.log_problems(), "the shared daemon logged:\n" + "\n".join(m.log_problems())


_case_ids = itertools.count()


@pytest.fixture
def d(shared: Mount) -> Iterator[Path]:
    """A fresh directory in the shared mount; after the test, the daemon must have logged
    nothing new and the store must pass fsck (live snapshot)."""
    path = shared.path / f"case-{next(_case_ids)}"
    path.mkdir()
    logged = len(shared.log_problems())
    yield path
    new = shared.log_problems()[logged:]
    assert not new, "the daemon logged:\n" + "\n".join(new)
    problems = store_problems(shared.store)
    assert not problems, "store inconsistent after the test:\n" + "\n".join(problems)


def version_of(path: Path) -> int:
    """The current version of a file in the mount."""
    return int(os.getxattr(path, "user.annofs.version"))


def stored_version(m: Mount, path: str) -> int:
    """The version a path names in an unmounted store."""
    vol = Volume.open(m.store)
    try:
        with vol.store.read() as txn:
            parts = [p.encode() for p in path.split("/") if p]
            return int(vol.namespace.resolve(txn, parts).target)
    finally:
        vol.close()


def touch(p: Path, data: bytes = b"") -> Path:
    p.write_bytes(data)
    return p


# -- errno values, one case each -----------------------------------------------------------

Setup = Callable[[Path], object]
Op = Callable[[Path], object]


def _files(*names: str) -> Setup:
    return lambda d: [touch(d / n, n.encode()) for n in names]


def _dirs(*names: str) -> Setup:
    return lambda d: [(d / n).mkdir(parents=True) for n in names]


def _both(*setups: Setup) -> Setup:
    return lambda d: [s(d) for s in setups]


def _long(d: Path) -> Path:
    return d / ("n" * 256)


ERRNO_CASES: dict[str, tuple[Setup, Op, int]] = {
    # regular files
    "open-missing": (_files(), lambda d: os.open(d / "nope", os.O_RDONLY), errno.ENOENT),
    "create-excl-existing": (_files("f"), lambda d: os.open(
        d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST),
    "path-through-file": (_files("f"), lambda d: os.stat(d / "f" / "x"), errno.ENOTDIR),
    "open-dir-for-writing": (_dirs("sub"), lambda d: os.open(d / "sub", os.O_WRONLY),
                             errno.EISDIR),
    "unlink-missing": (_files(), lambda d: os.unlink(d / "nope"), errno.ENOENT),
    "unlink-directory": (_dirs("sub"), lambda d: os.unlink(d / "sub"), errno.EISDIR),
    # directories
    "mkdir-existing": (_dirs("sub"), lambda d: os.mkdir(d / "sub"), errno.EEXIST),
    "mkdir-over-file": (_files("f"), lambda d: os.mkdir(d / "f"), errno.EEXIST),
    "rmdir-non-empty": (_both(_dirs("sub"), _files("sub/f")), lambda d: os.rmdir(d / "sub"),
                        errno.ENOTEMPTY),
    "rmdir-file": (_files("f"), lambda d: os.rmdir(d / "f"), errno.ENOTDIR),
    "rmdir-missing": (_files(), lambda d: os.rmdir(d / "nope"), errno.ENOENT),
    # symlinks
    "open-dangling-symlink": (lambda d: os.symlink("nowhere", d / "l"),
                              lambda d: os.open(d / "l", os.O_RDONLY), errno.ENOENT),
    "readlink-of-file": (_files("f"), lambda d: os.readlink(d / "f"), errno.EINVAL),
    "symlink-over-existing": (_files("f"), lambda d: os.symlink("x", d / "f"), errno.EEXIST),
    # hard links
    "link-to-directory": (_dirs("sub"), lambda d: os.link(d / "sub", d / "l"), errno.EPERM),
    "link-onto-existing": (_files("a", "b"), lambda d: os.link(d / "a", d / "b"),
                           errno.EEXIST),
    "link-missing": (_files(), lambda d: os.link(d / "nope", d / "l"), errno.ENOENT),
    # rename
    "rename-missing": (_files(), lambda d: os.rename(d / "nope", d / "x"), errno.ENOENT),
    "rename-file-over-directory": (_both(_files("f"), _dirs("sub")),
                                   lambda d: os.rename(d / "f", d / "sub"), errno.EISDIR),
    "rename-directory-over-file": (_both(_files("f"), _dirs("sub")),
                                   lambda d: os.rename(d / "sub", d / "f"), errno.ENOTDIR),
    "rename-directory-over-non-empty": (
        _both(_dirs("a", "b"), _files("b/f")), lambda d: os.rename(d / "a", d / "b"),
        errno.ENOTEMPTY),
    "rename-directory-into-itself": (
        _dirs("a/sub"), lambda d: os.rename(d / "a", d / "a" / "sub" / "a"), errno.EINVAL),
    "rename-noreplace-onto-existing": (
        _files("a", "b"), lambda d: renameat2(d / "a", d / "b", RENAME_NOREPLACE),
        errno.EEXIST),
    "rename-exchange-missing-target": (
        _files("a"), lambda d: renameat2(d / "a", d / "b", RENAME_EXCHANGE), errno.ENOENT),
    # extended attributes
    "getxattr-missing": (_files("f"), lambda d: os.getxattr(d / "f", "user.nope"),
                         errno.ENODATA),
    "removexattr-missing": (_files("f"), lambda d: os.removexattr(d / "f", "user.nope"),
                            errno.ENODATA),
    "setxattr-create-existing": (
        lambda d: os.setxattr(touch(d / "f"), "user.a", b"1"),
        lambda d: os.setxattr(d / "f", "user.a", b"2", os.XATTR_CREATE), errno.EEXIST),
    "setxattr-replace-missing": (
        _files("f"), lambda d: os.setxattr(d / "f", "user.a", b"2", os.XATTR_REPLACE),
        errno.ENODATA),
    "setxattr-computed-annofs": (
        _files("f"), lambda d: os.setxattr(d / "f", "user.annofs.version", b"7"),
        errno.EPERM),
    "setxattr-trusted": (_files("f"), lambda d: os.setxattr(d / "f", "trusted.x", b"v"),
                         errno.EOPNOTSUPP),
    "setxattr-security": (_files("f"), lambda d: os.setxattr(d / "f", "security.x", b"v"),
                          errno.EOPNOTSUPP),
    "setxattr-system": (_files("f"), lambda d: os.setxattr(d / "f", "system.x", b"v"),
                        errno.EOPNOTSUPP),
    "getxattr-trusted": (_files("f"), lambda d: os.getxattr(d / "f", "trusted.x"),
                         errno.EOPNOTSUPP),
    # names longer than statfs's f_namemax (255)
    "long-name-create": (_files(), lambda d: os.open(_long(d), os.O_CREAT | os.O_WRONLY),
                         errno.ENAMETOOLONG),
    "long-name-mkdir": (_files(), lambda d: os.mkdir(_long(d)), errno.ENAMETOOLONG),
    "long-name-symlink": (_files(), lambda d: os.symlink("x", _long(d)), errno.ENAMETOOLONG),
    "long-name-mkfifo": (_files(), lambda d: os.mkfifo(_long(d)), errno.ENAMETOOLONG),
    "long-name-link": (_files("f"), lambda d: os.link(d / "f", _long(d)), errno.ENAMETOOLONG),
    "long-name-rename": (_files("f"), lambda d: os.rename(d / "f", _long(d)),
                         errno.ENAMETOOLONG),
    "long-name-lookup": (_files(), lambda d: os.stat(_long(d)), errno.ENAMETOOLONG),
}


@pytest.mark.parametrize("case", list(ERRNO_CASES))
def test_errno(d: Path, case: str) -> None:
    setup, op, expected = ERRNO_CASES[case]
    setup(d)
    before = sorted(os.listdir(d))
    got = errno_of(op, d)
    assert got == expected, f"{case}: {errno.errorcode.get(got)}, " \
                            f"expected {errno.errorcode[expected]}"
    assert sorted(os.listdir(d)) == before, "a failed call changed the directory"


def test_write_to_read_only_descriptor_is_ebadf(d: Path) -> None:
    fd = os.open(touch(d / "f", b"x"), os.O_RDONLY)
    try:
        assert errno_of(os.write, fd, b"y") == errno.EBADF
    finally:
        os.close(fd)


# -- regular files ---------------------------------------------------------------------------


def test_write_then_read_back(d: Path) -> None:
    data = random.Random(1).randbytes(300_000)
    touch(d / "f", data)
    assert (d / "f").read_bytes() == data
    assert (d / "f").stat().st_size == len(data)


def test_read_own_writes_before_close(d: Path) -> None:
    fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"abcdef")
        assert os.pread(fd, 10, 0) == b"abcdef"
        other = os.open(d / "f", os.O_RDONLY)
        try:
            assert os.read(other, 10) == b"abcdef"
            assert os.fstat(other).st_size == 6
        finally:
            os.close(other)
    finally:
        os.close(fd)


def test_overwrite_in_the_middle(d: Path) -> None:
    data = bytearray(random.Random(2).randbytes(200_000))
    touch(d / "f", bytes(data))
    fd = os.open(d / "f", os.O_WRONLY)
    try:
        os.pwrite(fd, b"HELLO", 100_000)
    finally:
        os.close(fd)
    data[100_000:100_005] = b"HELLO"
    assert (d / "f").read_bytes() == bytes(data)


def test_open_with_o_trunc_empties_the_file(d: Path) -> None:
    touch(d / "f", b"a long first content\n")
    fd = os.open(d / "f", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new\n")
    finally:
        os.close(fd)
    assert (d / "f").read_bytes() == b"new\n"


def test_o_append_writes_at_the_end(d: Path) -> None:
    f = touch(d / "log", b"start\n")
    a = os.open(f, os.O_WRONLY | os.O_APPEND)
    b = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a if i % 2 else b, b"line %d\n" % i)
        os.lseek(a, 0, os.SEEK_SET)
        os.write(a, b"still at the end\n")
    finally:
        os.close(a)
        os.close(b)
    expected = b"start\n" + b"".join(b"line %d\n" % i for i in range(20)) + b"still at the end\n"
    assert f.read_bytes() == expected


def test_sparse_write_leaves_a_hole_of_zeros(d: Path) -> None:
    fd = os.open(d / "sparse", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"tail", 3_000_000)
    finally:
        os.close(fd)
    data = (d / "sparse").read_bytes()
    assert len(data) == 3_000_004
    assert data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:-4] == bytes(3_000_000 - 4)


def test_truncate_grows_with_zeros(d: Path) -> None:
    f = touch(d / "f", b"abc")
    os.truncate(f, 100_000)
    assert f.stat().st_size == 100_000
    assert f.read_bytes() == b"abc" + bytes(100_000 - 3)


def test_truncate_shrinks(d: Path) -> None:
    data = random.Random(3).randbytes(500_000)
    f = touch(d / "f", data)
    os.truncate(f, 1234)
    assert f.read_bytes() == data[:1234]


def test_shrink_then_grow_reads_zeros_not_old_bytes(d: Path) -> None:
    f = touch(d / "f", b"x" * 100_000)
    fd = os.open(f, os.O_RDWR)
    try:
        os.ftruncate(fd, 10)
        os.ftruncate(fd, 50_000)
        assert os.pread(fd, 50_000, 0) == b"x" * 10 + bytes(49_990)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"x" * 10 + bytes(49_990)


def test_write_at_an_offset_over_4gib(d: Path) -> None:
    # 64-bit offsets in write, read, getattr and the commit of a sparse file.
    high = (4 << 30) + 5
    f = d / "big"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"high bytes", high) == 10
        assert os.fstat(fd).st_size == high + 10
        assert f.stat().st_size == high + 10
        assert os.pread(fd, 20, high - 5) == bytes(5) + b"high bytes"
        assert os.pread(fd, 4096, 3 << 30) == bytes(4096)
        assert os.lseek(fd, 0, os.SEEK_END) == high + 10
    finally:
        os.close(fd)
    with open(f, "rb") as r:
        r.seek(high - 3)
        assert r.read() == bytes(3) + b"high bytes"
    assert f.stat().st_size == high + 10
    f.unlink()


def test_unlinked_open_file_stays_usable(d: Path) -> None:
    f = touch(d / "f", b"before")
    fd = os.open(f, os.O_RDWR)
    try:
        f.unlink()
        assert not f.exists()
        assert os.fstat(fd).st_nlink == 0
        os.pwrite(fd, b" and after", 6)
        assert os.pread(fd, 100, 0) == b"before and after"
        assert os.fstat(fd).st_size == 16
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_mmap_read_and_shared_write(d: Path) -> None:
    f = touch(d / "f", b"a" * 10_000)
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 0)
        assert m[:3] == b"aaa"
        m[5000:5003] = b"xyz"
        m.flush()
        m.close()
    data = f.read_bytes()
    assert data[5000:5003] == b"xyz" and len(data) == 10_000


def test_fsync_and_fdatasync_commit_a_version(d: Path) -> None:
    f = touch(d / "f", b"one")
    v1 = version_of(f)
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b" two")
        os.fsync(fd)
        v2 = version_of(f)
        os.write(fd, b" three")
        os.fdatasync(fd)
        v3 = version_of(f)
    finally:
        os.close(fd)
    assert v1 < v2 < v3
    assert version_of(f) == v3  # the close found nothing new to commit
    assert f.read_bytes() == b"one two three"


def test_digest_xattr_is_blake3_of_the_content(d: Path) -> None:
    data = random.Random(4).randbytes(1_000_000)
    f = touch(d / "f", data)
    assert os.getxattr(f, "user.annofs.digest").decode() \
        == "blake3:" + blake3.blake3(data).hexdigest()


# -- directories -------------------------------------------------------------------------------


def test_directory_nlink_counts_subdirectories(d: Path) -> None:
    assert d.stat().st_nlink == 2
    for n in ("a", "b", "c"):
        (d / n).mkdir()
    touch(d / "file")
    assert d.stat().st_nlink == 5
    (d / "b").rmdir()
    assert d.stat().st_nlink == 4


def test_directory_mtime_changes_when_entries_change(d: Path) -> None:
    os.utime(d, ns=(1_000_000_000, 1_000_000_000))
    touch(d / "f")
    assert d.stat().st_mtime_ns > 1_000_000_000


def test_readdir_lists_every_entry_with_its_type(d: Path) -> None:
    names = {f"file-{i:05d}-{'x' * (i % 60)}" for i in range(3000)}
    for n in names:
        touch(d / n)
    (d / "sub").mkdir()
    (d / "link").symlink_to("file-00000-")
    os.mkfifo(d / "fifo")
    with os.scandir(d) as it:
        entries = {e.name: e for e in it}
    assert set(entries) == names | {"sub", "link", "fifo"}
    assert entries["sub"].is_dir(follow_symlinks=False)
    assert entries["link"].is_symlink()
    assert stat.S_ISFIFO(entries["fifo"].stat(follow_symlinks=False).st_mode)
    assert all(entries[n].is_file(follow_symlinks=False) for n in names)


def test_remove_a_tree_while_listing_it(d: Path) -> None:
    tree = d / "tree"
    for i in range(20):
        sub = tree / f"s{i}"
        sub.mkdir(parents=True)
        for j in range(50):
            touch(sub / f"f{j}", b"x")
    shutil.rmtree(tree)
    assert os.listdir(d) == []


# -- symlinks and hard links ----------------------------------------------------------------


def test_symlink_readlink_and_lstat(d: Path) -> None:
    touch(d / "target", b"through the link")
    os.symlink("target", d / "link")
    assert os.readlink(d / "link") == "target"
    st = os.lstat(d / "link")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("target")
    assert (d / "link").read_bytes() == b"through the link"


def test_hard_link_shares_inode_and_content(d: Path) -> None:
    a, b = touch(d / "a", b"shared"), d / "b"
    os.link(a, b)
    sa, sb = a.stat(), b.stat()
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    with open(b, "ab") as w:
        w.write(b" content")
    assert a.read_bytes() == b"shared content"
    os.chmod(a, 0o600)
    assert stat.S_IMODE(b.stat().st_mode) == 0o600


def test_unlink_one_name_of_a_hard_link(d: Path) -> None:
    a, b = touch(d / "a", b"data"), d / "b"
    os.link(a, b)
    a.unlink()
    assert b.stat().st_nlink == 1
    assert b.read_bytes() == b"data"


def test_hard_link_across_directories(d: Path) -> None:
    (d / "d1").mkdir()
    (d / "d2").mkdir()
    a = touch(d / "d1" / "a", b"x")
    os.link(a, d / "d2" / "b")
    assert (d / "d2" / "b").stat().st_ino == a.stat().st_ino
    assert a.stat().st_nlink == 2


def test_a_new_file_at_a_renamed_hard_link_name_is_its_own_file(d: Path) -> None:
    f = touch(d / "f", b"original")
    os.link(f, d / "g")
    os.rename(d / "g", d / "h")  # ln f g; mv g h; echo NEW > g
    touch(d / "g", b"NEW")
    assert f.read_bytes() == b"original"
    assert (d / "h").read_bytes() == b"original"
    assert (d / "g").read_bytes() == b"NEW"
    assert (d / "g").stat().st_ino != f.stat().st_ino
    assert (f.stat().st_nlink, (d / "g").stat().st_nlink) == (2, 1)


def drop_kernel_caches() -> None:
    """Make the kernel forget unused dentries and inodes (FUSE FORGETs follow)."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
    except OSError as e:
        pytest.skip(f"cannot drop the kernel's caches here: {e}")


def test_hard_link_keeps_its_inode_number_when_the_kernel_forgets_it(mnt: Mount) -> None:
    # tar, cp -a and rsync -H find hard links by st_ino over a long walk, during which
    # the kernel may forget the inode between one name and the next. (A file linked
    # while the kernel holds its inode keeps its first number until forgotten: hence
    # the remount, which starts from links made earlier, the case of such a walk.)
    a = touch(mnt.path / "a", b"x")
    os.link(a, mnt.path / "b")
    mnt.stop()
    mnt.start()
    ino = a.stat().st_ino
    drop_kernel_caches()
    assert (mnt.path / "b").stat().st_ino == ino
    assert (mnt.path / "b").stat().st_nlink == 2


def test_rename_onto_another_name_of_the_same_file_does_nothing(d: Path) -> None:
    a, b = touch(d / "a", b"x"), d / "b"
    os.link(a, b)
    os.rename(a, b)
    assert a.exists() and b.exists() and b.stat().st_nlink == 2


# -- rename ------------------------------------------------------------------------------------


def test_rename_within_a_directory(d: Path) -> None:
    a = touch(d / "a", b"content")
    ino = a.stat().st_ino
    os.rename(a, d / "b")
    assert not a.exists()
    assert (d / "b").read_bytes() == b"content"
    assert (d / "b").stat().st_ino == ino


def test_rename_over_an_existing_file(d: Path) -> None:
    touch(d / "a", b"new")
    touch(d / "b", b"old")
    os.rename(d / "a", d / "b")
    assert os.listdir(d) == ["b"]
    assert (d / "b").read_bytes() == b"new"


def test_rename_across_directories(d: Path) -> None:
    (d / "d1" / "deep").mkdir(parents=True)
    (d / "d2").mkdir()
    touch(d / "d1" / "deep" / "f", b"moved")
    os.rename(d / "d1" / "deep" / "f", d / "d2" / "g")
    assert (d / "d2" / "g").read_bytes() == b"moved"
    assert os.listdir(d / "d1" / "deep") == []


def test_rename_a_directory_with_contents_across_directories(d: Path) -> None:
    src = d / "a" / "tree"
    (src / "x" / "y").mkdir(parents=True)
    touch(src / "x" / "y" / "f", b"deep")
    (d / "b").mkdir()
    os.rename(src, d / "b" / "tree")
    assert (d / "b" / "tree" / "x" / "y" / "f").read_bytes() == b"deep"
    assert (d / "a").stat().st_nlink == 2
    assert (d / "b").stat().st_nlink == 3
    touch(d / "b" / "tree" / "x" / "y" / "g", b"still writable")
    assert sorted(os.listdir(d / "b" / "tree" / "x" / "y")) == ["f", "g"]


def test_rename_directory_over_empty_directory(d: Path) -> None:
    (d / "a").mkdir()
    touch(d / "a" / "f", b"x")
    (d / "b").mkdir()
    os.rename(d / "a", d / "b")
    assert os.listdir(d) == ["b"]
    assert (d / "b" / "f").read_bytes() == b"x"
    assert d.stat().st_nlink == 3


def test_rename_noreplace_to_a_free_name(d: Path) -> None:
    touch(d / "a", b"a")
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert os.listdir(d) == ["c"]
    assert (d / "c").read_bytes() == b"a"


def test_rename_exchange_swaps_two_files(d: Path) -> None:
    touch(d / "a", b"A")
    touch(d / "b", b"B")
    ino_a = (d / "a").stat().st_ino
    renameat2(d / "a", d / "b", RENAME_EXCHANGE)
    assert (d / "a").read_bytes() == b"B" and (d / "b").read_bytes() == b"A"
    assert (d / "b").stat().st_ino == ino_a


def test_rename_exchange_swaps_a_file_and_a_directory(d: Path) -> None:
    (d / "d1").mkdir()
    (d / "d2" / "sub").mkdir(parents=True)
    touch(d / "d1" / "f", b"file")
    touch(d / "d2" / "sub" / "g", b"inside")
    renameat2(d / "d1" / "f", d / "d2" / "sub", RENAME_EXCHANGE)
    assert (d / "d2" / "sub").read_bytes() == b"file"
    assert (d / "d1" / "f" / "g").read_bytes() == b"inside"
    assert (d / "d1").stat().st_nlink == 3
    assert (d / "d2").stat().st_nlink == 2


def test_rename_an_open_file_then_write_and_close(d: Path) -> None:
    (d / "a").mkdir()
    f = touch(d / "a" / "f", b"begin")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.rename(d / "a", d / "b")
        os.write(fd, b" end")
    finally:
        os.close(fd)
    assert (d / "b" / "f").read_bytes() == b"begin end"


def test_rename_over_an_open_file_keeps_its_content_for_the_reader(d: Path) -> None:
    touch(d / "old", b"old content")
    touch(d / "new", b"new content")
    fd = os.open(d / "old", os.O_RDONLY)
    try:
        os.rename(d / "new", d / "old")
        assert os.pread(fd, 100, 0) == b"old content"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert (d / "old").read_bytes() == b"new content"


def test_rename_updates_the_ctime_of_the_moved_file(d: Path) -> None:
    f = touch(d / "a")
    before = f.stat().st_ctime_ns
    time.sleep(0.01)
    os.rename(f, d / "b")
    assert (d / "b").stat().st_ctime_ns > before


# -- attributes ------------------------------------------------------------------------------


def test_chmod_sets_mode_and_ctime(d: Path) -> None:
    f = touch(d / "f")
    before = f.stat()
    time.sleep(0.01)
    os.chmod(f, 0o4751)
    st = f.stat()
    assert stat.S_IMODE(st.st_mode) == 0o4751 and stat.S_ISREG(st.st_mode)
    assert st.st_ctime_ns > before.st_ctime_ns
    assert st.st_mtime_ns == before.st_mtime_ns


def test_chown_by_root(d: Path) -> None:
    f = touch(d / "f")
    os.chown(f, 1234, 5678)
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.symlink("f", d / "l")
    os.lchown(d / "l", 42, 43)
    assert (os.lstat(d / "l").st_uid, os.lstat(d / "l").st_gid) == (42, 43)
    assert f.stat().st_uid == 1234


def test_utimens_sets_nanosecond_times(d: Path) -> None:
    f = touch(d / "f", b"x")
    os.utime(f, ns=(1_234_567_891_234_567_891, 987_654_321_987_654_321))
    st = f.stat()
    assert st.st_atime_ns == 1_234_567_891_234_567_891
    assert st.st_mtime_ns == 987_654_321_987_654_321


def test_utime_now(d: Path) -> None:
    f = touch(d / "f", b"x")
    os.utime(f, ns=(0, 0))
    t0 = time.time_ns()
    os.utime(f)
    st = f.stat()
    assert t0 - 10**9 < st.st_mtime_ns < time.time_ns() + 10**9
    assert t0 - 10**9 < st.st_atime_ns < time.time_ns() + 10**9


def test_utime_omit_keeps_the_other_time(d: Path) -> None:
    f = touch(d / "f", b"x")
    os.utime(f, ns=(5_000_000_000, 7_000_000_000))
    subprocess.run(["touch", "-a", "-d", "@100", str(f)], check=True)  # mtime: UTIME_OMIT
    st = f.stat()
    assert st.st_atime_ns == 100_000_000_000 and st.st_mtime_ns == 7_000_000_000


def test_epoch_mtime_set_before_close_survives_the_close(mnt: Mount) -> None:
    fd = os.open(mnt.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"data")
        os.utime(fd, ns=(0, 0))  # 1970-01-01: as tar restores an archive's zero times
    finally:
        os.close(fd)
    mnt.stop()  # the kernel caches attributes: ask the store
    mnt.start()
    assert (mnt.path / "f").stat().st_mtime_ns == 0


def test_write_updates_mtime(d: Path) -> None:
    f = touch(d / "f", b"x")
    os.utime(f, ns=(0, 0))
    with open(f, "ab") as w:
        w.write(b"y")
    assert f.stat().st_mtime_ns > 0


def test_access_as_root_follows_the_execute_bits(d: Path) -> None:
    f = touch(d / "f")
    os.chmod(f, 0o644)
    assert os.access(f, os.R_OK | os.W_OK)
    assert not os.access(f, os.X_OK)
    os.chmod(f, 0o744)
    assert os.access(f, os.X_OK)


# -- extended attributes, names, special files ------------------------------------------------


def test_user_xattrs_set_get_list_remove(d: Path) -> None:
    f = touch(d / "f")
    os.setxattr(f, "user.one", b"1")
    os.setxattr(f, "user.two", b"\x00binary\xff" * 100)
    assert os.getxattr(f, "user.one") == b"1"
    assert os.getxattr(f, "user.two") == b"\x00binary\xff" * 100
    assert sorted(os.listxattr(f)) == ["user.one", "user.two"]
    os.setxattr(f, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.one") == b"replaced"
    os.removexattr(f, "user.one")
    assert os.listxattr(f) == ["user.two"]


def test_user_xattrs_on_a_directory(d: Path) -> None:
    os.setxattr(d, "user.dir", b"yes")
    assert os.getxattr(d, "user.dir") == b"yes"
    assert os.listxattr(d) == ["user.dir"]


def test_computed_xattrs_are_readable_but_not_listed(d: Path) -> None:
    f = touch(d / "f", b"x")
    assert os.listxattr(f) == []
    assert int(os.getxattr(f, "user.annofs.version")) > 0
    assert os.getxattr(f, "user.annofs.digest").startswith(b"blake3:")


def test_statfs_reports_255_byte_names(d: Path) -> None:
    assert os.statvfs(d).f_namemax == 255


def test_name_of_255_bytes_works(d: Path) -> None:
    touch(d / ("n" * 255), b"x")
    assert os.listdir(d) == ["n" * 255]
    os.rename(d / ("n" * 255), d / ("m" * 255))
    assert (d / ("m" * 255)).read_bytes() == b"x"


def test_mkfifo_makes_a_working_fifo(d: Path) -> None:
    p = d / "fifo"
    os.mkfifo(p, 0o640)
    st = os.lstat(p)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(p, os.O_WRONLY)
    try:
        os.write(w, b"through the pipe")
        assert os.read(r, 100) == b"through the pipe"
    finally:
        os.close(w)
        os.close(r)


def test_mknod_character_device_keeps_rdev(d: Path) -> None:
    p = d / "null"
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = os.lstat(p)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    # the mount is nodev: the node exists but cannot be opened as a device
    assert errno_of(os.open, p, os.O_RDONLY) == errno.EACCES


# -- permissions (default_permissions) and other users ----------------------------------------


def _stat_at(dfd: int, name: str) -> tuple[int, int, int]:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    return st.st_uid, st.st_gid, st.st_mode


def _read_at(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def _write_at(dfd: int, name: str, data: bytes, flags: int = os.O_WRONLY) -> None:
    fd = os.open(name, flags, 0o644, dir_fd=dfd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _make_all_kinds(dfd: int) -> list[tuple[int, int, int]]:
    _write_at(dfd, "file", b"", os.O_CREAT | os.O_WRONLY)
    os.mkdir("dir", dir_fd=dfd)
    os.symlink("file", "link", dir_fd=dfd)
    os.mkfifo("fifo", dir_fd=dfd)
    return [_stat_at(dfd, n) for n in ("file", "dir", "link", "fifo")]


@pytest.fixture
def dfd(d: Path) -> Iterator[int]:
    """A descriptor of the case directory, for children running as another user."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.fixture
def pub(d: Path) -> Iterator[int]:
    """A descriptor of a world-writable directory `pub` in the case directory."""
    (d / "pub").mkdir()
    os.chmod(d / "pub", 0o777)
    fd = os.open(d / "pub", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_other_users_are_refused_without_allow_other(mnt: Mount) -> None:
    touch(mnt.path / "f", b"x")
    os.chmod(mnt.path / "f", 0o644)
    fd = os.open(mnt.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert errno_of(as_user, _stat_at, fd, "f") == errno.EACCES
    finally:
        os.close(fd)


def test_allow_other_lets_other_users_in(d: Path, dfd: int) -> None:
    touch(d / "f", b"for everyone")
    os.chmod(d / "f", 0o644)
    assert as_user(_read_at, dfd, "f") == b"for everyone"
    assert as_user(os.listdir, dfd) == ["f"]


def test_read_without_permission_is_eacces(d: Path, dfd: int) -> None:
    touch(d / "secret", b"x")
    os.chmod(d / "secret", 0o600)
    assert errno_of(as_user, _read_at, dfd, "secret") == errno.EACCES


def test_write_without_permission_is_eacces(d: Path, dfd: int) -> None:
    touch(d / "f", b"x")
    os.chmod(d / "f", 0o644)
    assert errno_of(as_user, _write_at, dfd, "f", b"y") == errno.EACCES
    assert (d / "f").read_bytes() == b"x"


def test_create_in_a_directory_without_write_permission_is_eacces(d: Path, dfd: int) -> None:
    assert errno_of(as_user, _write_at, dfd, "new", b"y", os.O_CREAT | os.O_WRONLY) \
        == errno.EACCES
    assert errno_of(as_user, os.mkdir, "newdir", 0o755, dir_fd=dfd) == errno.EACCES
    assert os.listdir(d) == []


def test_traversal_without_search_permission_is_eacces(d: Path, dfd: int) -> None:
    (d / "private").mkdir()
    touch(d / "private" / "f", b"x")
    os.chmod(d / "private", 0o700)
    assert errno_of(as_user, _stat_at, dfd, "private/f") == errno.EACCES


def test_new_entries_take_the_callers_uid_and_gid(d: Path, pub: int) -> None:
    made = as_user(_make_all_kinds, pub)
    assert [(uid, gid) for uid, gid, _ in made] == [(NOBODY, NOBODY)] * 4
    st = (d / "pub" / "file").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_setgid_directory_gives_its_group_to_new_entries(d: Path, pub: int) -> None:
    team = d / "pub" / "team"
    team.mkdir()
    os.chown(team, 0, 4242)
    os.chmod(team, 0o2777)
    fd = os.open(team, os.O_RDONLY | os.O_DIRECTORY)
    try:
        made = as_user(_make_all_kinds, fd)
    finally:
        os.close(fd)
    assert [gid for _, gid, _ in made] == [4242] * 4
    assert made[1][2] & stat.S_ISGID  # a new subdirectory inherits the setgid bit


def test_chmod_of_another_users_file_is_eperm(d: Path, pub: int) -> None:
    touch(d / "pub" / "f")
    os.chmod(d / "pub" / "f", 0o666)
    assert errno_of(as_user, os.chmod, "f", 0o777, dir_fd=pub) == errno.EPERM


def test_owner_may_chmod_own_file(pub: int) -> None:
    def make_and_chmod(dfd: int) -> int:
        _write_at(dfd, "mine", b"", os.O_CREAT | os.O_WRONLY)
        os.chmod("mine", 0o600, dir_fd=dfd)
        return os.stat("mine", dir_fd=dfd).st_mode

    assert stat.S_IMODE(as_user(make_and_chmod, pub)) == 0o600


def test_truncating_open_by_the_owner_drops_setuid_and_setgid(pub: int) -> None:
    """As the kernel does for truncate(2) and write(2) by a caller without CAP_FSETID;
    an O_TRUNC open is truncated by annofs itself (atomic O_TRUNC), so annofs must.
    Found by the exerciser run as an ordinary user."""
    def modes(dfd: int) -> list[int]:
        out = []
        for mode in (0o6775, 0o6765):  # setgid goes only with group execute
            _write_at(dfd, "suid", b"x", os.O_CREAT | os.O_WRONLY)
            os.chmod("suid", mode, dir_fd=dfd)
            _write_at(dfd, "suid", b"", os.O_WRONLY | os.O_TRUNC)
            out.append(stat.S_IMODE(os.stat("suid", dir_fd=dfd).st_mode))
        return out

    assert as_user(modes, pub) == [0o775, 0o2765]


def test_chown_by_a_non_root_owner_is_eperm(pub: int) -> None:
    def make_and_chown(dfd: int) -> None:
        _write_at(dfd, "mine", b"", os.O_CREAT | os.O_WRONLY)
        os.chown("mine", 0, 0, dir_fd=dfd)

    assert errno_of(as_user, make_and_chown, pub) == errno.EPERM


def test_explicit_times_on_another_users_file_is_eperm(d: Path, pub: int) -> None:
    touch(d / "pub" / "f")
    os.chmod(d / "pub" / "f", 0o666)
    assert errno_of(as_user, os.utime, "f", ns=(1, 1), dir_fd=pub) == errno.EPERM
    as_user(os.utime, "f", dir_fd=pub)  # "now" needs only write permission


def test_sticky_directory_protects_other_users_files(d: Path, pub: int) -> None:
    os.chmod(d / "pub", 0o1777)
    touch(d / "pub" / "roots")
    assert errno_of(as_user, os.unlink, "roots", dir_fd=pub) == errno.EPERM
    as_user(_write_at, pub, "own", b"x", os.O_CREAT | os.O_WRONLY)
    as_user(os.unlink, "own", dir_fd=pub)
    assert os.listdir(d / "pub") == ["roots"]


def test_access_as_another_user(d: Path, dfd: int) -> None:
    touch(d / "f")
    os.chmod(d / "f", 0o604)

    def check(fd: int) -> tuple[bool, bool]:
        return os.access("f", os.R_OK, dir_fd=fd), os.access("f", os.W_OK, dir_fd=fd)

    assert as_user(check, dfd) == (True, False)


# -- versions and the cost of a commit (a mount of their own) ---------------------------------


def test_each_close_of_a_changed_file_makes_a_child_version(mnt: Mount) -> None:
    f = mnt.path / "f"
    contents = [b"first\n", b"first\nsecond\n", b"first\nsecond\nthird\n"]
    seen = []
    for c in contents:
        with open(f, "ab") as w:  # no O_TRUNC: one version per close
            w.write(c[f.stat().st_size if f.exists() else 0:])
        seen.append(version_of(f))
    with open(f, "rb") as r:
        r.read()
    with open(f, "r+b") as w:
        w.write(b"first\n")  # the same bytes: not a change
    assert version_of(f) == seen[-1]
    mnt.stop()
    out = annofs("--store", str(mnt.store), "log", "/f").stdout.splitlines()[1:]  # header
    ids = [int(line.split()[0]) for line in out]
    assert ids == [*reversed(seen), 0]  # newest first; each the parent of the one above
    digests = [line.split()[4] for line in out]
    assert digests == ["blake3:" + blake3.blake3(c).hexdigest()
                       for c in [*reversed(contents), b""]]
    mnt.start()


def test_one_byte_edit_in_a_large_file_rechunks_little(mnt: Mount) -> None:
    f = mnt.path / "large"
    block = random.Random(5).randbytes(1 << 20)
    with open(f, "wb") as w:
        for i in range(256):  # 256 MiB, no two MiB alike
            w.write(block[i:] + block[:i])
    before = stats(mnt)["rechunked_bytes"]
    parent = version_of(f)
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"!", 123_456_789)
    finally:
        os.close(fd)
    rechunked = stats(mnt)["rechunked_bytes"] - before
    # From the start of the fragment holding the byte to where the cuts meet the old
    # ones again: a few fragments (64 KiB at most each), not the file.
    assert 0 < rechunked <= 4 * 64 * 1024, f"a 1-byte edit re-chunked {rechunked} bytes"
    child = version_of(f)
    assert child > parent
    with open(f, "rb") as r:
        r.seek(123_456_789)
        assert r.read(1) == b"!"
    mnt.stop()
    assert stored_version(mnt, "/large") == child
    log = annofs("--store", str(mnt.store), "log", "/large").stdout.splitlines()[1:]
    assert [int(line.split()[0]) for line in log[:2]] == [child, parent]
    mnt.start()


def test_sparse_file_commit_cost_follows_the_data(mnt: Mount) -> None:
    # A hole is not data: committing a file with 4 GiB of hole must not chunk it.
    f = mnt.path / "sparse"
    high = (4 << 30) + 5
    before = stats(mnt).get("rechunked_bytes", 0)
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, b"tail", high)
    finally:
        os.close(fd)
    assert stats(mnt)["rechunked_bytes"] - before < 16 << 20
    mnt.stop()
    mnt.start()
    assert f.stat().st_size == high + 4
    with open(f, "rb") as r:
        r.seek(high - 4)
        assert r.read() == bytes(4) + b"tail"
        r.seek(2 << 30)
        assert r.read(1 << 20) == bytes(1 << 20)


# -- persistence and faults ---------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                k: os.getxattr(p, k) for k in os.listxattr(p)}
            out[str(p.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink,
                st.st_rdev, content, xattrs)
    return out


def test_everything_survives_a_remount(mnt: Mount) -> None:
    p = mnt.path
    (p / "d" / "e").mkdir(parents=True)
    touch(p / "d" / "f", random.Random(6).randbytes(200_000))
    touch(p / "d" / "e" / "empty")
    os.link(p / "d" / "f", p / "hard")
    os.symlink("d/f", p / "sym")
    os.mkfifo(p / "fifo")
    os.chmod(p / "d" / "f", 0o640)
    os.chown(p / "d" / "e" / "empty", 7, 8)
    os.setxattr(p / "d" / "f", "user.k", b"v")
    os.setxattr(p / "d", "user.dir", b"w")
    os.utime(p / "d" / "e", ns=(10**18, 10**18))
    fd = os.open(p / "d" / "late", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"written, timed, then closed")
    os.utime(fd, ns=(10**9, 2 * 10**9))  # as cp -a and tar do before the close
    os.close(fd)
    before = _snapshot(p)
    assert before["d/late"][4] == 2 * 10**9
    mnt.stop()
    mnt.start()
    assert _snapshot(p) == before
    assert (p / "hard").stat().st_ino == (p / "d" / "f").stat().st_ino


def test_every_handler_answers_only_with_fuse_errors() -> None:
    # pyfuse3 ends its main loop on any other exception and the mount then answers
    # ECONNABORTED forever: every operation annofs implements must be wrapped by
    # fuse_handler (domain errors -> errno; anything else logged, EIO). t3 checks what
    # the wrapper does; this checks that nothing bypasses it. (`init` is a synchronous
    # hook, not a request: pyfuse3 calls it from a C callback that reports and drops any
    # exception.)
    from annofs.fs.operations import Operations

    base = set(vars(pyfuse3.Operations))
    handlers = [n for n, f in vars(Operations).items()
                if n in base and not n.startswith("_") and callable(f) and n != "init"]
    assert len(handlers) >= 25
    unwrapped = [n for n in handlers if not hasattr(vars(Operations)[n], "__wrapped__")]
    assert unwrapped == []


@pytest.mark.expected_log(r"ERROR annofs\.fs: read: fragment [0-9a-f]+: content does not "
                          r"match its hash")
def test_corrupt_fragment_reads_eio_and_the_mount_lives(mounted: Mount) -> None:
    # Not the checked fixture: the store is damaged on purpose, and fsck must say so.
    good = random.Random(7).randbytes(50_000)
    bad = random.Random(8).randbytes(50_000)
    touch(mounted.path / "good", good)
    touch(mounted.path / "bad", bad)
    mounted.stop()
    # Random bytes are stored raw (zstd would not shrink them): found in their pack.
    (data_file,) = [p for p in (mounted.store / "packs").iterdir()
                    if bad[20_000:20_064] in p.read_bytes()]
    raw = bytearray(data_file.read_bytes())
    at = raw.find(bad[20_000:20_064])
    assert at >= 0 and raw.find(bad[20_000:20_064], at + 1) < 0
    raw[at] ^= 0x01
    data_file.write_bytes(raw)
    mounted.start()
    assert errno_of((mounted.path / "bad").read_bytes) == errno.EIO
    assert (mounted.path / "good").read_bytes() == good
    touch(mounted.path / "after", b"the mount still works")
    assert (mounted.path / "after").read_bytes() == b"the mount still works"
    mounted.stop()
    res = annofs("--store", str(mounted.store), "fsck", check=False)
    assert res.returncode == 1
    assert "content does not match its hash" in res.stdout


# -- calls annofs does not implement (or did not), and the fallbacks tools use (stress-ng) ----

_libc = ctypes.CDLL(None, use_errno=True)


def test_fallocate_and_posix_fallocate_grow_the_file(d: Path) -> None:
    """fallocate reaches annofs (pyfuse3 patched, scripts/pyfuse3-patched.sh): mode 0
    grows the file as a hole; COLLAPSE_RANGE, which annofs does not do, is EOPNOTSUPP
    (every mode against ext4: t4_fuse_holes.py)."""
    f = touch(d / "f", b"abc")
    fd = os.open(f, os.O_RDWR)
    try:
        assert _libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(10_000)) == 0
        assert os.fstat(fd).st_size == 10_000
        os.posix_fallocate(fd, 0, 20_000)  # glibc: the fallocate call, no zeros written
        assert os.fstat(fd).st_size == 20_000
        assert _libc.fallocate(fd, 0x08, ctypes.c_long(0), ctypes.c_long(4096)) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert f.read_bytes() == b"abc" + bytes(20_000 - 3)


def test_o_tmpfile_is_eopnotsupp(d: Path) -> None:
    assert errno_of(os.open, d, os.O_TMPFILE | os.O_RDWR, 0o600) == errno.EOPNOTSUPP


def test_copy_file_range_copies_through_the_kernel_fallback(d: Path) -> None:
    data = random.Random(3).randbytes(300_000)
    src, dst = touch(d / "src", data), touch(d / "dst")
    a, b = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        copied = 0
        while copied < len(data):
            n = os.copy_file_range(a, b, len(data) - copied)
            assert n > 0
            copied += n
    finally:
        os.close(a)
        os.close(b)
    assert dst.read_bytes() == data


def test_xattr_create_and_replace_flags(d: Path) -> None:
    f = touch(d / "f")
    os.setxattr(f, "user.a", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, f, "user.a", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.b", b"2", os.XATTR_REPLACE) == errno.ENODATA
    assert os.getxattr(f, "user.a") == b"1" and os.listxattr(f) == ["user.a"]


# -- Unix sockets (issue 16) ------------------------------------------------------------------


def _socket_round_trip(dfd: int) -> tuple[int, bytes]:
    """bind, listen, connect and exchange bytes through a socket named in `dfd`; its mode.

    Relative names from a changed directory: the caller may not reach the absolute path
    (pytest's tmp_path is private), and sun_path holds 108 bytes at most.
    """
    os.fchdir(dfd)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("sock")
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect("sock")
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                got = peer.recv(16)
                peer.sendall(got + b" pong")
                answer = client.recv(16)
    mode = os.lstat("sock").st_mode
    os.unlink("sock")
    return mode, answer


def _connect_and_ask(dfd: int, name: str) -> bytes:
    os.fchdir(dfd)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(name)
        client.sendall(b"hello")
        return client.recv(64)


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_unix_socket_binds_connects_and_carries_bytes(pub: int, who: str) -> None:
    creds = (0, 0, ()) if who == "root" else (NOBODY, NOBODY, ())
    mode, answer = run_as(creds, _socket_round_trip, pub)
    assert stat.S_ISSOCK(mode) and answer == b"ping pong"


def test_a_socket_bound_by_one_user_is_reached_by_another(d: Path, pub: int) -> None:
    """The node in the mount names the listening socket for every process: a client of
    another uid connects when the socket's mode lets it write, and not otherwise."""
    here = os.getcwd()
    os.fchdir(pub)
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind("srv")
    finally:
        os.chdir(here)
    with server:
        server.listen(1)
        os.chmod(d / "pub" / "srv", 0o700)
        assert errno_of(as_user, _connect_and_ask, pub, "srv") == errno.EACCES
        os.chmod(d / "pub" / "srv", 0o777)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the client, as nobody
            code = 1
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                code = 0 if _connect_and_ask(pub, "srv") == b"HELLO" else 1
            finally:
                os._exit(code)
        peer, _ = server.accept()
        with peer:
            peer.sendall(peer.recv(64).upper())
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    st = os.lstat(d / "pub" / "srv")
    assert stat.S_ISSOCK(st.st_mode) and st.st_size == 0 and st.st_uid == 0
    listed = subprocess.run(["find", d / "pub", "-mindepth", "1", "-printf", "%y %f\n"],
                            capture_output=True, text=True, check=True).stdout
    assert listed == "s srv\n"  # the type readdir gives (find uses d_type)


def test_a_socket_survives_a_remount_and_a_nar_dump_refuses_it(mnt: Mount) -> None:
    """The node is stored (the connection is not: nothing listens after a restart, as on
    any disk); a NAR cannot hold a socket, so `nar dump` says so in one line, as Nix does."""
    (mnt.path / "tree").mkdir()
    touch(mnt.path / "tree" / "f", b"x")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.getcwd()
    os.chdir(mnt.path / "tree")
    try:
        s.bind("sock")
    finally:
        os.chdir(here)
        s.close()
    mnt.stop()
    mnt.start()
    st = os.lstat(mnt.path / "tree" / "sock")
    assert stat.S_ISSOCK(st.st_mode)
    res = annofs("nar", "dump", str(mnt.path / "tree"), check=False)
    assert res.returncode == 2
    assert res.stderr.strip().endswith("tree/sock: a socket cannot be put in a NAR")
    assert res.stderr.count("\n") == 1
    res = annofs("--store", str(mnt.store), "fsck", check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# -- ctime when an inode loses a name (issue 16) ------------------------------------------------


def _ctime_after_link_loss(root: Path, how: str) -> tuple[bool, bool]:
    """Make f with two names (f, g), lose one by `how`; whether f's ctime moved on, and
    whether it is still later than before once the kernel has forgotten the inode."""
    f = touch(root / "f", b"data")
    os.link(f, root / "g")
    touch(root / "other", b"other")
    before = f.stat().st_ctime_ns
    time.sleep(0.02)
    if how == "unlink":
        os.unlink(root / "g")
    else:
        os.rename(root / "other", root / "g")  # over the second name
    moved = f.stat().st_ctime_ns > before
    drop_kernel_caches()
    return moved, os.stat(f).st_ctime_ns > before


@pytest.mark.parametrize("how", ["unlink", "rename-over"])
def test_losing_a_name_updates_the_ctime_of_the_remaining_inode(
        d: Path, tmp_path: Path, how: str) -> None:
    (tmp_path / "native").mkdir()
    assert _ctime_after_link_loss(tmp_path / "native", how) == (True, True)  # ext4
    assert _ctime_after_link_loss(d, how) == (True, True)


def _lose_a_name_at(dfd: int, how: str) -> int:
    """As `_ctime_after_link_loss`, relative to a directory descriptor; f's ctime before."""
    _write_at(dfd, "f", b"data", os.O_CREAT | os.O_WRONLY)
    os.link("f", "g", src_dir_fd=dfd, dst_dir_fd=dfd)
    _write_at(dfd, "other", b"other", os.O_CREAT | os.O_WRONLY)
    before = os.stat("f", dir_fd=dfd).st_ctime_ns
    time.sleep(0.02)
    if how == "unlink":
        os.unlink("g", dir_fd=dfd)
    else:
        os.rename("other", "g", src_dir_fd=dfd, dst_dir_fd=dfd)
    return before


@pytest.mark.parametrize("how", ["unlink", "rename-over"])
def test_losing_a_name_by_another_user_updates_the_ctime(d: Path, pub: int, how: str) -> None:
    before = as_user(_lose_a_name_at, pub, how)
    drop_kernel_caches()  # what the daemon stored, not the kernel's own stamp
    st = os.stat(d / "pub" / "f")
    assert st.st_ctime_ns > before and st.st_nlink == 1 and st.st_uid == NOBODY


def test_ctime_of_link_loss_is_stored(mnt: Mount) -> None:
    f = touch(mnt.path / "f", b"data")
    os.link(f, mnt.path / "g")
    os.link(f, mnt.path / "h")
    before = f.stat().st_ctime_ns
    time.sleep(0.02)
    os.unlink(mnt.path / "g")
    touch(mnt.path / "x")
    os.rename(mnt.path / "x", mnt.path / "h")
    after = f.stat().st_ctime_ns
    mnt.stop()
    mnt.start()
    assert os.stat(mnt.path / "f").st_ctime_ns == after > before


# -- the same operation on ext4 and on the mount, as root and as another user (issue 16) ------
#
# Each case is a setup (run as root in an empty directory, mode 0777) and an operation run
# by the caller in a forked child through a directory descriptor. It runs on a directory
# of the native disk (ext4 under pytest's tmp_path) and on one in the mount, in the same
# run; the outcome (result or errno) and the tree afterwards (type, mode, owner, group,
# link count, size of each entry) must be the same. The mount uses default_permissions,
# so the kernel checks modes, sticky directories and protected hard links; setgid
# inheritance, the mode bits that survive a create and what chown/truncate/write clear
# are annofs's (or the kernel's through its requests to annofs): the table says which.

OTHER = 4242  # a uid and gid that is neither caller's
CALLERS = {"root": (0, 0, ()), "nobody": (NOBODY, NOBODY, ()),
           "member": (NOBODY, NOBODY, (OTHER,))}  # nobody, in group OTHER too

Step = Callable[[int], object]


def _file(name: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Step:
    def make(dfd: int) -> None:
        fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600, dir_fd=dfd)
        os.write(fd, b"data")
        os.close(fd)
        os.chown(name, uid, gid, dir_fd=dfd)
        os.chmod(name, mode, dir_fd=dfd)  # after chown, which clears setuid
    return make


def _dir(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Step:
    def make(dfd: int) -> None:
        os.mkdir(name, dir_fd=dfd)
        os.chown(name, uid, gid, dir_fd=dfd)
        os.chmod(name, mode, dir_fd=dfd)
    return make


def _link(name: str, target: str) -> Step:
    return lambda dfd: os.symlink(target, name, dir_fd=dfd)


def _fifo(name: str, mode: int = 0o644, uid: int = 0) -> Step:
    def make(dfd: int) -> None:
        os.mkfifo(name, dir_fd=dfd)
        os.chown(name, uid, uid, dir_fd=dfd)
        os.chmod(name, mode, dir_fd=dfd)
    return make


def _all(*steps: Step) -> Step:
    return lambda dfd: [s(dfd) for s in steps] and None


MINE = _file("mine", 0o644, NOBODY, NOBODY)
THEIRS = _file("theirs", 0o644, OTHER, OTHER)
THEIRS_RW = _file("theirs", 0o666, OTHER, OTHER)
RO = _dir("ro", 0o755)  # root's: only root may write in it
STICKY = _dir("t", 0o1777)
SETGID = _dir("sg", 0o2777, 0, OTHER)


def _at(fn: Callable[..., object], *args: object, **kw: object) -> Step:
    """`fn(*args, dir_fd=dfd, **kw)`: an operation relative to the case directory."""
    return lambda dfd: fn(*args, dir_fd=dfd, **kw) and None


def _in(fn: Callable[..., object], *args: object) -> Step:
    """`fn(*args)` with the case directory as the working directory (path-only calls)."""
    def op(dfd: int) -> object:
        os.fchdir(dfd)
        return fn(*args)
    return op


def _open(name: str, flags: int, mode: int = 0o666) -> Step:
    def op(dfd: int) -> None:
        os.close(os.open(name, flags, mode, dir_fd=dfd))
    return op


def _ftruncate(name: str, flags: int, size: int) -> Step:
    def op(dfd: int) -> None:
        fd = os.open(name, flags, dir_fd=dfd)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return op


def _write(name: str) -> Step:
    def op(dfd: int) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_APPEND, dir_fd=dfd)
        try:
            os.write(fd, b"more")
        finally:
            os.close(fd)
    return op


def _renameat2(old: str, new: str, flags: int) -> Step:
    def op(dfd: int) -> None:
        os.fchdir(dfd)
        renameat2(old, new, flags)
    return op


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _utimensat(name: str, atime: tuple[int, int], mtime: tuple[int, int],
               flags: int = 0) -> Step:
    """utimensat(2) with UTIME_NOW/UTIME_OMIT (os.utime has neither); the times after, for
    explicit ones (now is not comparable)."""
    def op(dfd: int) -> tuple[int, int] | None:
        libc = ctypes.CDLL(None, use_errno=True)
        times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
        if libc.utimensat(dfd, name.encode(), times, flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), name)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=not flags)
        return (st.st_atime_ns if atime[1] < UTIME_OMIT else None,
                st.st_mtime_ns if mtime[1] < UTIME_OMIT else None)
    return op


def _fchmodat_nofollow(name: str, mode: int) -> Step:
    """fchmodat(AT_SYMLINK_NOFOLLOW): os.chmod cannot ask for it with a dir_fd."""
    def op(dfd: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fchmodat(dfd, name.encode(), mode, AT_SYMLINK_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), name)
    return op


NOW, OMIT, T1, T2 = (0, UTIME_NOW), (0, UTIME_OMIT), (1_000_000, 123), (2_000_000, 456)

# name: (setup, operation[, callers]); callers are root and nobody unless listed.
COMPARED: dict[str, tuple] = {
    # chmod
    "chmod-own": (MINE, _at(os.chmod, "mine", 0o600)),
    "chmod-theirs": (THEIRS, _at(os.chmod, "theirs", 0o600)),
    "chmod-setgid-of-a-group-not-mine": (_file("mine", 0o644, NOBODY, OTHER),
                                         _at(os.chmod, "mine", 0o2755),
                                         ("root", "nobody", "member")),
    "chmod-setuid-own": (MINE, _at(os.chmod, "mine", 0o4755)),
    "chmod-sticky-on-a-file": (MINE, _at(os.chmod, "mine", 0o1644)),
    "chmod-missing": (MINE, _at(os.chmod, "nope", 0o600)),
    "chmod-behind-a-private-dir": (_all(_dir("priv", 0o700), _file("priv/x", 0o644, NOBODY)),
                                   _at(os.chmod, "priv/x", 0o600)),
    "chmod-through-a-symlink": (_all(MINE, _link("l", "mine")), _at(os.chmod, "l", 0o640)),
    # chown
    "chown-own-to-another-uid": (MINE, _at(os.chown, "mine", OTHER, -1)),
    "chown-own-to-a-group": (MINE, _at(os.chown, "mine", -1, OTHER),
                             ("root", "nobody", "member")),
    "chown-own-to-itself": (MINE, _at(os.chown, "mine", NOBODY, NOBODY)),
    "chown-nothing": (MINE, _at(os.chown, "mine", -1, -1)),
    "chown-theirs": (THEIRS_RW, _at(os.chown, "theirs", NOBODY, -1)),
    "chown-clears-setuid-setgid": (_file("s", 0o6755, NOBODY, NOBODY),
                                   _at(os.chown, "s", -1, NOBODY)),
    "chown-by-root-clears-setuid": (_file("s", 0o6755, NOBODY, NOBODY),
                                    _at(os.chown, "s", OTHER, OTHER), ("root",)),
    "chown-group-of-setgid-without-group-exec": (_file("s", 0o2644, NOBODY, NOBODY),
                                                 _at(os.chown, "s", -1, NOBODY)),
    "lchown-symlink": (_link("l", "x"), _at(os.chown, "l", NOBODY, NOBODY,
                                            follow_symlinks=False)),
    # link
    "link-into-a-dir-not-writable": (_all(MINE, RO), _in(os.link, "mine", "ro/x")),
    "link-theirs-unreadable": (_file("theirs", 0o600, OTHER, OTHER),
                               _in(os.link, "theirs", "x")),
    "link-theirs-read-write": (THEIRS_RW, _in(os.link, "theirs", "x")),
    "link-a-directory": (_dir("sub", 0o777), _in(os.link, "sub", "x")),
    "link-over-an-existing-name": (_all(MINE, THEIRS_RW), _in(os.link, "theirs", "mine")),
    "link-missing": (MINE, _in(os.link, "nope", "x")),
    "link-a-symlink-of-roots": (_all(MINE, _link("l", "mine")),
                                lambda dfd: os.link("l", "x", src_dir_fd=dfd, dst_dir_fd=dfd,
                                                    follow_symlinks=False)),
    "link-a-fifo-of-roots": (_fifo("p", 0o666), _in(os.link, "p", "x")),
    "link-own": (MINE, _in(os.link, "mine", "x")),
    # mkdir
    "mkdir-in-a-dir-not-writable": (RO, _at(os.mkdir, "ro/x")),
    "mkdir-existing": (MINE, _at(os.mkdir, "mine")),
    "mkdir-in-a-setgid-dir": (SETGID, _at(os.mkdir, "sg/x", 0o755),
                              ("root", "nobody", "member")),
    "mkdir-with-every-mode-bit": (_file("f"), _at(os.mkdir, "x", 0o7777)),
    "mkdir-in-a-sticky-dir": (STICKY, _at(os.mkdir, "t/x")),
    "mkdir-missing-parent": (MINE, _at(os.mkdir, "nope/x")),
    "mkdir-under-a-file": (MINE, _at(os.mkdir, "mine/x")),
    # mkfifo
    "mkfifo-in-a-dir-not-writable": (RO, _at(os.mkfifo, "ro/p")),
    "mkfifo-existing": (MINE, _at(os.mkfifo, "mine")),
    "mkfifo-in-a-setgid-dir": (SETGID, _at(os.mkfifo, "sg/p", 0o2666),
                               ("root", "nobody", "member")),
    "mkfifo-with-every-mode-bit": (_file("f"), _at(os.mkfifo, "p", 0o7777)),
    # mknod
    "mknod-char-device": (_file("f"), _at(os.mknod, "c", stat.S_IFCHR | 0o600,
                                          os.makedev(1, 3))),
    "mknod-block-device": (_file("f"), _at(os.mknod, "b", stat.S_IFBLK | 0o600,
                                           os.makedev(7, 0))),
    "mknod-socket": (_file("f"), _at(os.mknod, "s", stat.S_IFSOCK | 0o600)),
    "mknod-regular": (_file("f"), _at(os.mknod, "r", stat.S_IFREG | 0o640)),
    "mknod-directory-type": (_file("f"), _at(os.mknod, "d", stat.S_IFDIR | 0o755)),
    "mknod-existing": (MINE, _at(os.mknod, "mine", stat.S_IFIFO | 0o600)),
    "mknod-in-a-dir-not-writable": (RO, _at(os.mknod, "ro/p", stat.S_IFIFO | 0o600)),
    "mknod-setgid-file-in-a-setgid-dir": (SETGID, _at(os.mknod, "sg/r",
                                                      stat.S_IFREG | 0o2755),
                                          ("root", "nobody", "member")),
    # open
    "open-read-unreadable": (_file("theirs", 0o600, OTHER), _open("theirs", os.O_RDONLY)),
    "open-write-own-read-only": (_file("mine", 0o444, NOBODY), _open("mine", os.O_WRONLY)),
    "open-read-write-theirs-writable": (THEIRS_RW, _open("theirs", os.O_RDWR)),
    "open-create-in-a-dir-not-writable": (RO, _open("ro/x", os.O_CREAT | os.O_WRONLY)),
    "open-create-exclusive-existing": (MINE, _open("mine", os.O_CREAT | os.O_EXCL
                                                   | os.O_WRONLY)),
    "open-create-exclusive-symlink": (_link("l", "nowhere"),
                                      _open("l", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    "open-directory-flag-on-a-file": (MINE, _open("mine", os.O_RDONLY | os.O_DIRECTORY)),
    "open-a-directory-for-writing": (_dir("sub", 0o777), _open("sub", os.O_WRONLY)),
    "open-truncate-read-only-file": (_file("mine", 0o444, NOBODY),
                                     _open("mine", os.O_RDONLY | os.O_TRUNC)),
    "open-nofollow-symlink": (_all(MINE, _link("l", "mine")),
                              _open("l", os.O_RDONLY | os.O_NOFOLLOW)),
    "open-create-through-a-dangling-symlink": (_link("l", "target"),
                                               _open("l", os.O_CREAT | os.O_WRONLY, 0o640)),
    "open-create-with-every-mode-bit": (_file("f"), _open("x", os.O_CREAT | os.O_WRONLY,
                                                          0o7777)),
    "open-create-setgid-in-a-setgid-dir": (SETGID, _open("sg/x", os.O_CREAT | os.O_WRONLY,
                                                         0o2755),
                                           ("root", "nobody", "member")),
    "open-file-with-a-trailing-slash": (MINE, _open("mine/", os.O_RDONLY)),
    "open-truncate-theirs-writable": (THEIRS_RW, _open("theirs", os.O_WRONLY | os.O_TRUNC)),
    # rename
    "rename-theirs-in-a-sticky-dir": (_all(STICKY, _file("t/theirs", 0o666, OTHER)),
                                      _in(os.rename, "t/theirs", "t/x")),
    "rename-own-in-a-sticky-dir": (_all(STICKY, _file("t/mine", 0o644, NOBODY)),
                                   _in(os.rename, "t/mine", "t/x")),
    "rename-own-over-theirs-in-a-sticky-dir": (
        _all(STICKY, _file("t/mine", 0o644, NOBODY), _file("t/theirs", 0o666, OTHER)),
        _in(os.rename, "t/mine", "t/theirs")),
    "rename-theirs-in-a-sticky-dir-i-own": (
        _all(_dir("t", 0o1777, NOBODY), _file("t/theirs", 0o666, OTHER)),
        _in(os.rename, "t/theirs", "t/x")),
    "rename-exchange-in-a-sticky-dir": (
        _all(STICKY, _file("t/mine", 0o644, NOBODY), _file("t/theirs", 0o666, OTHER)),
        _renameat2("t/mine", "t/theirs", RENAME_EXCHANGE)),
    "rename-out-of-a-dir-not-writable": (_all(RO, _file("ro/f", 0o666, NOBODY)),
                                         _in(os.rename, "ro/f", "x")),
    "rename-into-a-dir-not-writable": (_all(RO, MINE), _in(os.rename, "mine", "ro/mine")),
    "rename-a-dir-into-itself": (_all(_dir("a", 0o777), _dir("a/b", 0o777)),
                                 _in(os.rename, "a", "a/b/c")),
    "rename-a-dir-over-a-non-empty-dir": (
        _all(_dir("a", 0o777), _dir("b", 0o777), _file("b/x")), _in(os.rename, "a", "b")),
    "rename-a-file-over-a-dir": (_all(MINE, _dir("sub", 0o777)), _in(os.rename, "mine", "sub")),
    "rename-a-dir-over-a-file": (_all(MINE, _dir("sub", 0o777)), _in(os.rename, "sub", "mine")),
    "rename-their-dir-to-another-parent": (
        _all(_dir("theirs", 0o755, OTHER), _dir("dst", 0o777)),
        _in(os.rename, "theirs", "dst/theirs")),
    "rename-their-dir-in-place": (_dir("theirs", 0o755, OTHER),
                                  _in(os.rename, "theirs", "renamed")),
    "rename-missing": (MINE, _in(os.rename, "nope", "x")),
    "rename-noreplace-over-existing": (_all(MINE, THEIRS_RW),
                                       _renameat2("mine", "theirs", RENAME_NOREPLACE)),
    # rmdir
    "rmdir-non-empty": (_all(_dir("sub", 0o777), _file("sub/x")), _at(os.rmdir, "sub")),
    "rmdir-a-file": (MINE, _at(os.rmdir, "mine")),
    "rmdir-theirs-in-a-sticky-dir": (_all(STICKY, _dir("t/theirs", 0o777, OTHER)),
                                     _at(os.rmdir, "t/theirs")),
    "rmdir-own-in-a-sticky-dir": (_all(STICKY, _dir("t/mine", 0o755, NOBODY)),
                                  _at(os.rmdir, "t/mine")),
    "rmdir-in-a-dir-not-writable": (_all(RO, _dir("ro/sub", 0o777, NOBODY)),
                                    _at(os.rmdir, "ro/sub")),
    "rmdir-dot": (_dir("sub", 0o777), _at(os.rmdir, "sub/.")),
    "rmdir-missing": (MINE, _at(os.rmdir, "nope")),
    # symlink
    "symlink-existing": (MINE, _at(os.symlink, "x", "mine")),
    "symlink-in-a-dir-not-writable": (RO, _at(os.symlink, "x", "ro/l")),
    "symlink-in-a-setgid-dir": (SETGID, _at(os.symlink, "x", "sg/l"),
                                ("root", "nobody", "member")),
    "symlink-target-of-4095-bytes": (_file("f"), _at(os.symlink, "t" * 4095, "l")),
    "symlink-target-of-4096-bytes": (_file("f"), _at(os.symlink, "t" * 4096, "l")),
    # truncate
    "truncate-theirs-not-writable": (THEIRS, _in(os.truncate, "theirs", 1)),
    "truncate-own-read-only": (_file("mine", 0o444, NOBODY), _in(os.truncate, "mine", 1)),
    "truncate-a-directory": (_dir("sub", 0o777), _in(os.truncate, "sub", 0)),
    "truncate-negative": (MINE, _in(os.truncate, "mine", -1)),
    "truncate-setuid-own": (_file("s", 0o6775, NOBODY, NOBODY), _in(os.truncate, "s", 1)),
    "truncate-through-a-symlink": (_all(THEIRS_RW, _link("l", "theirs")),
                                   _in(os.truncate, "l", 2)),
    "ftruncate-read-only-descriptor": (MINE, _ftruncate("mine", os.O_RDONLY, 1)),
    "ftruncate-setgid-theirs": (_file("s", 0o2777, OTHER, OTHER),
                                _ftruncate("s", os.O_WRONLY, 1)),
    # unlink
    "unlink-theirs-in-a-sticky-dir": (_all(STICKY, _file("t/theirs", 0o666, OTHER)),
                                      _at(os.unlink, "t/theirs")),
    "unlink-own-in-a-sticky-dir": (_all(STICKY, _file("t/mine", 0o644, NOBODY)),
                                   _at(os.unlink, "t/mine")),
    "unlink-theirs-in-a-sticky-dir-i-own": (
        _all(_dir("t", 0o1777, NOBODY), _file("t/theirs", 0o666, OTHER)),
        _at(os.unlink, "t/theirs")),
    "unlink-in-a-dir-not-writable": (_all(RO, _file("ro/f", 0o666, NOBODY)),
                                     _at(os.unlink, "ro/f")),
    "unlink-a-directory": (_dir("sub", 0o777), _at(os.unlink, "sub")),
    "unlink-missing": (MINE, _at(os.unlink, "nope")),
    "unlink-with-a-trailing-slash": (MINE, _at(os.unlink, "mine/")),
    # utimensat
    "utimensat-times-on-theirs-writable": (THEIRS_RW, _utimensat("theirs", T1, T2)),
    "utimensat-now-on-theirs-writable": (THEIRS_RW, _utimensat("theirs", NOW, NOW)),
    "utimensat-now-on-theirs-read-only": (THEIRS, _utimensat("theirs", NOW, NOW)),
    "utimensat-omit-both-on-theirs": (THEIRS, _utimensat("theirs", OMIT, OMIT)),
    "utimensat-now-and-omit-on-theirs-writable": (THEIRS_RW,
                                                  _utimensat("theirs", NOW, OMIT)),
    "utimensat-a-time-and-now-on-theirs-writable": (THEIRS_RW,
                                                    _utimensat("theirs", T1, NOW)),
    "utimensat-times-on-own-read-only": (_file("mine", 0o444, NOBODY),
                                         _utimensat("mine", T1, T2)),
    "utimensat-symlink-itself": (_link("l", "x"),
                                 _utimensat("l", T1, T2, AT_SYMLINK_NOFOLLOW)),
    "chmod-a-symlink-itself": (_all(MINE, _link("l", "mine")), _fchmodat_nofollow("l", 0o600)),
    "chown-a-setgid-dir-by-root": (_dir("sub", 0o2775, NOBODY, NOBODY),
                                   _at(os.chown, "sub", OTHER, OTHER), ("root",)),
    "chown-setgid-file-to-my-other-group": (_file("s", 0o2755, NOBODY, NOBODY),
                                            _at(os.chown, "s", -1, OTHER), ("member",)),
    "unlink-one-name-of-a-hard-link": (_all(MINE, lambda dfd: os.link(
        "mine", "two", src_dir_fd=dfd, dst_dir_fd=dfd)), _at(os.unlink, "two")),
    "rename-over-one-name-of-a-hard-link": (
        _all(MINE, lambda dfd: os.link("mine", "two", src_dir_fd=dfd, dst_dir_fd=dfd),
             _file("new", 0o644, NOBODY)), _in(os.rename, "new", "two")),
    "rename-a-hard-link-onto-its-other-name": (
        _all(MINE, lambda dfd: os.link("mine", "two", src_dir_fd=dfd, dst_dir_fd=dfd)),
        _in(os.rename, "two", "mine")),
    "rename-a-dir-out-of-a-setgid-dir": (_all(SETGID, _dir("sg/sub", 0o2777, NOBODY, OTHER)),
                                         _in(os.rename, "sg/sub", "sub")),
    "mkdir-in-a-dir-of-mine-not-writable": (_dir("mine", 0o555, NOBODY),
                                            _at(os.mkdir, "mine/x")),
    "rmdir-the-dir-itself-when-empty-and-not-writable": (_dir("sub", 0o555, NOBODY),
                                                         _at(os.rmdir, "sub")),
    "open-create-existing-theirs-in-a-sticky-dir": (
        _all(STICKY, _file("t/theirs", 0o666, OTHER)),
        _open("t/theirs", os.O_CREAT | os.O_WRONLY)),
    "truncate-a-fifo": (_fifo("p", 0o666), _in(os.truncate, "p", 0)),
    "open-a-socket": (_file("f"), lambda dfd: (os.mknod("s", stat.S_IFSOCK | 0o666,
                                                        dir_fd=dfd),
                                               os.open("s", os.O_RDONLY, dir_fd=dfd))),
    "chmod-own-fifo": (_fifo("p", 0o644, NOBODY), _at(os.chmod, "p", 0o600)),
    "utimensat-times-on-own-fifo": (_fifo("p", 0o644, NOBODY), _utimensat("p", T1, T2)),
    "unlink-dot": (_dir("sub", 0o777), _at(os.unlink, "sub/.")),
    "rmdir-dot-dot": (_all(_dir("sub", 0o777), _dir("sub/in", 0o777)),
                      _at(os.rmdir, "sub/in/..")),
    "symlink-empty-target": (_file("f"), _at(os.symlink, "", "l")),
    "open-create-directory-flags": (_file("f"), _open("x", os.O_CREAT | os.O_DIRECTORY
                                                      | os.O_RDONLY)),
    "rename-a-dir-over-an-empty-dir-elsewhere": (
        _all(_dir("a", 0o777), _dir("a/sub", 0o777), _dir("b", 0o777), _dir("b/sub", 0o777),
             _file("a/sub/x")),
        _in(os.rename, "a/sub", "b/sub")),
    "rename-exchange-a-dir-into-its-own-subdir": (
        _all(_dir("a", 0o777), _dir("a/b", 0o777)),
        _renameat2("a", "a/b", RENAME_EXCHANGE)),
    "rename-a-file-onto-itself": (MINE, _in(os.rename, "mine", "mine")),
    "link-to-a-name-with-a-trailing-slash": (MINE, _in(os.link, "mine", "x/")),
    # what a write by another user clears (the kernel asks annofs to)
    "write-clears-setuid-setgid": (_file("s", 0o6777, OTHER, OTHER), _write("s")),
}


def _stats(dfd: int) -> dict[str, os.stat_result]:
    """Every entry under the directory (and the directory itself, as ".")."""
    out = {".": os.stat(".", dir_fd=dfd)}
    stack = [""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(os.path.join(f"/proc/self/fd/{dfd}", rel))):
            path = os.path.join(rel, name)
            st = out[path] = os.stat(path, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
    return out


def _tree(before: dict[str, os.stat_result], dfd: int) -> list[tuple]:
    """Every entry after the operation: name, mode, owner, group, links, size of files,
    and whether its ctime and mtime moved (for entries that were there before)."""
    out = []
    for path, st in _stats(dfd).items():
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
        old = before.get(path)
        moved = None if old is None or old.st_ino != st.st_ino else (
            st.st_ctime_ns != old.st_ctime_ns, st.st_mtime_ns != old.st_mtime_ns)
        out.append((path, oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, size, moved))
    return sorted(out)


def _outcome(caller: str, op: Step, dfd: int) -> tuple[str, object]:
    try:
        return "ok", run_as(CALLERS[caller], op, dfd)
    except OSError as e:
        return "error", errno.errorcode.get(e.errno, e.errno)


@pytest.fixture(scope="module")
def native_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the native side of each compared case runs: ext4 (checked)."""
    base = tmp_path_factory.mktemp("native")
    fstype = subprocess.run(["stat", "-f", "-c", "%T", base], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert fstype == "ext2/ext3", f"{base} is on {fstype}, not ext4"
    return base


def _case_dir(path: Path) -> int:
    path.mkdir()
    os.chmod(path, 0o777)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize("case,caller", [
    (name, caller) for name, spec in COMPARED.items()
    for caller in (spec[2] if len(spec) > 2 else ("root", "nobody"))])
def test_the_mount_answers_as_ext4(shared: Mount, native_base: Path, case: str,
                                   caller: str) -> None:
    setup, op = COMPARED[case][:2]
    logged = len(shared.log_problems())
    seen = {}
    for side, base in (("ext4", native_base), ("annofs", shared.path)):
        dfd = _case_dir(base / f"cmp-{case}-{caller}")
        try:
            setup(dfd)
            before = _stats(dfd)
            time.sleep(0.002)  # a change shows in ext4's timestamps too
            seen[side] = (_outcome(caller, op, dfd), _tree(before, dfd))
        finally:
            os.close(dfd)
    assert seen["annofs"][0] == seen["ext4"][0], "the outcome differs"
    assert seen["annofs"][1] == seen["ext4"][1], "the tree afterwards differs"
    new = shared.log_problems()[logged:]
    assert not new, "the daemon logged:\n" + "\n".join(new)
