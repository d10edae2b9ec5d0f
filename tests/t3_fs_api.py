"""t3: the FUSE operations called directly, in process: no kernel, no mount.

The middle tier (S3QL's tests/t3_fs_api.py): each test awaits `Operations` handlers the
way the kernel would call them, through `Kernel`, a small stand-in that also keeps the
kernel's lookup counts so a test can forget everything at its end and check that the
inode table is back to the root alone. What a handler stored is checked through the
layers below (`vol.namespace`, `vol.versions`), and after every test `check_store` must
find the store consistent.

pyfuse3 types that Python cannot build are replaced by what the handlers read from them:
`Ctx` for `RequestContext`, `Fields` for `SetattrFields` (its attributes are read-only),
and `pyfuse3.readdir_reply` is patched to collect entries into a `Page`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import random
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import blake3
import pyfuse3
import pytest
import trio
import trio.testing
from store_damage import damage, evict_packs

from annofs.content.versions import EMPTY_VERSION
from annofs.fs.operations import READ_PARTS, Operations
from annofs.maintenance.fsck import check_store
from annofs.namespace.tree import MAX_NAME
from annofs.store.records import Attrs, Version
from annofs.volume import Volume

ROOT = pyfuse3.ROOT_INODE
MiB = 1 << 20


# -- stand-ins for what only the kernel and pyfuse3's C side can make --------------------------


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What handlers read from a pyfuse3.RequestContext."""

    uid: int = 1234
    gid: int = 5678
    pid: int = 4321
    umask: int = 0o022


CTX = Ctx()


@dataclasses.dataclass
class Fields:
    """A pyfuse3.SetattrFields whose flags can be set (pyfuse3's are read-only)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


@dataclasses.dataclass
class Page:
    """The token a patched readdir_reply fills: accepts `budget` entries, then says no."""

    budget: int | None
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = dataclasses.field(
        default_factory=list)

    def offer(self, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if self.budget is not None and len(self.entries) >= self.budget:
            return False
        self.entries.append((name, attr, next_id))
        return True


def _readdir_reply(token: Page, name: bytes, attr: pyfuse3.EntryAttributes,
                   next_id: int) -> bool:
    return token.offer(name, attr, next_id)


class Kernel:
    """Calls `Operations` as the kernel does and keeps the kernel's lookup counts."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.refs: Counter[int] = Counter()

    def _held(self, e: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        self.refs[e.st_ino] += 1
        return e

    # entries the kernel then holds a reference to
    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        return self._held(await self.ops.lookup(parent, name, CTX))

    async def create(self, parent: int, name: bytes,
                     mode: int = 0o644) -> tuple[int, pyfuse3.EntryAttributes]:
        fi, e = await self.ops.create(parent, name, mode, os.O_RDWR | os.O_CREAT, CTX)
        return fi.fh, self._held(e)

    async def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> pyfuse3.EntryAttributes:
        return self._held(await self.ops.mkdir(parent, name, mode, CTX))

    async def mknod(self, parent: int, name: bytes, mode: int,
                    rdev: int = 0) -> pyfuse3.EntryAttributes:
        return self._held(await self.ops.mknod(parent, name, mode, rdev, CTX))

    async def symlink(self, parent: int, name: bytes, target: bytes) -> pyfuse3.EntryAttributes:
        return self._held(await self.ops.symlink(parent, name, target, CTX))

    async def link(self, ino: int, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        return self._held(await self.ops.link(ino, parent, name, CTX))

    # everything else
    async def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        return await self.ops.getattr(ino, CTX)

    async def setattr(self, ino: int, fh: int | None = None, *, size: int | None = None,
                      mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      atime_ns: int | None = None,
                      mtime_ns: int | None = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        fields = Fields()
        for value, field, flag in ((size, "st_size", "update_size"),
                                   (mode, "st_mode", "update_mode"),
                                   (uid, "st_uid", "update_uid"),
                                   (gid, "st_gid", "update_gid"),
                                   (atime_ns, "st_atime_ns", "update_atime"),
                                   (mtime_ns, "st_mtime_ns", "update_mtime")):
            if value is not None:
                setattr(attr, field, value)
                setattr(fields, flag, True)
        return await self.ops.setattr(ino, attr, fields, fh, CTX)

    async def open(self, ino: int, flags: int = os.O_RDWR) -> int:
        return (await self.ops.open(ino, flags, CTX)).fh

    async def read(self, fh: int, off: int = 0, size: int = 1 << 30) -> bytes:
        data = await self.ops.read(fh, off, size)
        # A big read may answer with its parts: pyfuse3 as scripts/pyfuse3-patched.sh builds
        # it sends them as one reply, in order.
        return b"".join(data) if isinstance(data, list) else data

    async def write(self, fh: int, off: int, data: bytes) -> None:
        assert await self.ops.write(fh, off, data) == len(data)

    async def flush(self, fh: int) -> None:
        await self.ops.flush(fh)

    async def release(self, fh: int) -> None:
        await self.ops.release(fh)

    async def unlink(self, parent: int, name: bytes) -> None:
        await self.ops.unlink(parent, name, CTX)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self.ops.rmdir(parent, name, CTX)

    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes,
                     flags: int = 0) -> None:
        await self.ops.rename(p_old, n_old, p_new, n_new, flags, CTX)

    async def readdir_page(self, fh: int, start_id: int,
                           budget: int | None) -> list[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """One readdir call: the entries accepted (each one a lookup reference)."""
        page = Page(budget)
        await self.ops.readdir(fh, start_id, page)
        for _, e, _ in page.entries:
            self._held(e)
        return page.entries

    async def listdir(self, ino: int,
                      budget: int | None = None) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """A whole listing, resumed from each call's last next_id, as getdents does."""
        fh = await self.ops.opendir(ino, CTX)
        out: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
        start = 0
        try:
            while page := await self.readdir_page(fh, start, budget):
                out += [(name, e) for name, e, _ in page]
                start = page[-1][2]
        finally:
            await self.ops.releasedir(fh)
        return out

    async def names(self, ino: int) -> list[bytes]:
        return [name for name, _ in await self.listdir(ino)]

    # compound helpers
    async def write_file(self, parent: int, name: bytes, data: bytes) -> int:
        """create + write + release: the new file's inode number."""
        fh, e = await self.create(parent, name)
        if data:
            await self.write(fh, 0, data)
        await self.release(fh)
        return e.st_ino

    async def cat(self, ino: int) -> bytes:
        fh = await self.open(ino, os.O_RDONLY)
        try:
            return await self.read(fh)
        finally:
            await self.release(fh)

    async def forget_all(self) -> None:
        refs = [(ino, n) for ino, n in self.refs.items() if ino != ROOT]
        self.refs.clear()
        if refs:
            await self.ops.forget(refs)

    async def settle(self) -> None:
        """Forget every reference the kernel holds: nothing may be left behind."""
        await self.forget_all()
        assert self.ops.handles == {}, "handles left open"
        assert self.ops.open_files == {}, "open-file state left behind"
        leaked = {ino: (n.parent, n.name, n.lookups, n.opens)
                  for ino, n in self.ops.inodes.by_ino.items() if ino != ROOT}
        assert not leaked, f"inodes left after forgetting all: {leaked}"


# -- fixtures and helpers ------------------------------------------------------------------------


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in its own trio loop (pytest-trio is not a dependency)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return run


@pytest.fixture(autouse=True)
def consistent_store(vol: Volume) -> Iterator[None]:
    """After every test, the store's counts must match what is stored."""
    yield
    problems = check_store(vol).problems
    if problems:
        pytest.fail("fsck after the test:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def ops(vol: Volume) -> Operations:
    return Operations(vol)


@pytest.fixture
def k(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> Kernel:
    monkeypatch.setattr(pyfuse3, "readdir_reply", _readdir_reply)
    return Kernel(ops)


@contextlib.contextmanager
def fuse_errno(code: int) -> Iterator[None]:
    """The block must raise FUSEError(code)."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        yield
    got = info.value.errno
    assert got == code, f"errno {errno.errorcode.get(got, got)}, expected {errno.errorcode[code]}"


def stored(vol: Volume, *path: bytes) -> Attrs:
    """The committed attributes at a path, as the namespace has them."""
    with vol.store.read() as txn:
        return vol.namespace.resolve(txn, list(path))


def stored_names(vol: Volume, *path: bytes) -> list[bytes]:
    with vol.store.read() as txn:
        return [n for n, _ in vol.namespace.listdir(txn, int(vol.namespace.resolve(
            txn, list(path)).target))]


def version(vol: Volume, vid: int) -> Version:
    with vol.store.read() as txn:
        return vol.versions.get(txn, vid)


def version_content(vol: Volume, vid: int) -> bytes:
    with vol.store.read() as txn:
        v = vol.versions.get(txn, vid)
        return vol.versions.read(txn, v, 0, v.size)


def version_ids(vol: Volume) -> list[int]:
    with vol.store.read() as txn:
        return list(vol.versions.iter_ids(txn))


def fragments(v: Version) -> list[bytes]:
    return [v.fragment_hash(i) for i in range(v.count)]


async def stats(ops: Operations) -> dict[str, int]:
    """The mount's work counters (the root's user.annofs.stats)."""
    return json.loads(await ops.getxattr(ROOT, b"user.annofs.stats", CTX))


# -- lookup and attributes -----------------------------------------------------------------------


@trio_test
async def test_root_and_children_lookup_getattr(k: Kernel) -> None:
    root = await k.getattr(ROOT)
    assert root.st_ino == ROOT
    assert stat.S_ISDIR(root.st_mode)
    assert root.st_nlink == 2

    fh, f = await k.create(ROOT, b"f", 0o666)
    await k.release(fh)
    d = await k.mkdir(ROOT, b"d", 0o750)
    assert len({ROOT, f.st_ino, d.st_ino}) == 3

    lf = await k.lookup(ROOT, b"f")
    assert lf.st_ino == f.st_ino
    assert stat.S_ISREG(lf.st_mode) and lf.st_size == 0 and lf.st_nlink == 1
    # The kernel already applied the umask; the filesystem must not apply it again.
    assert stat.S_IMODE(lf.st_mode) == 0o666
    assert (lf.st_uid, lf.st_gid) == (CTX.uid, CTX.gid)
    ga = await k.getattr(f.st_ino)
    assert (ga.st_ino, ga.st_mode, ga.st_size) == (f.st_ino, lf.st_mode, 0)

    ld = await k.lookup(ROOT, b"d")
    assert ld.st_ino == d.st_ino and stat.S_ISDIR(ld.st_mode)
    assert stat.S_IMODE(ld.st_mode) == 0o750 and ld.st_nlink == 2
    assert (await k.getattr(ROOT)).st_nlink == 3  # . .. and d's ..

    with fuse_errno(errno.ENOENT):
        await k.lookup(ROOT, b"missing")
    with fuse_errno(errno.ENOENT):
        await k.lookup(d.st_ino, b"f")
    with fuse_errno(errno.ENOTDIR):
        await k.lookup(f.st_ino, b"x")
    with fuse_errno(errno.ESTALE):
        await k.getattr(f.st_ino + d.st_ino + 100)  # a number never handed out
    await k.settle()


@trio_test
async def test_a_big_read_answers_with_its_parts_in_order(k: Kernel) -> None:
    # Parts (slices of pack reads, holes' zeros) that pyfuse3 sends with one writev: their
    # concatenation is exactly the range asked for, each fragment checked.
    data = random.Random(11).randbytes(3 * MiB)
    fh, e = await k.create(ROOT, b"big")
    await k.write(fh, 0, data)
    await k.write(fh, 5 * MiB, b"tail")  # a hole between
    await k.release(fh)
    whole = data + bytes(2 * MiB) + b"tail"
    fh = await k.open(e.st_ino, os.O_RDONLY)
    for off, size in ((0, MiB), (12345, MiB), (3 * MiB - 100, MiB), (5 * MiB - 3, MiB)):
        got = await k.ops.read(fh, off, size)
        assert isinstance(got, list) == READ_PARTS
        assert (b"".join(got) if isinstance(got, list) else got) == whole[off:off + size]
    await k.release(fh)
    await k.settle()


@trio_test
async def test_forget_drops_inodes_unless_open(k: Kernel, ops: Operations) -> None:
    ino = await k.write_file(ROOT, b"f", b"data")
    for _ in range(3):
        assert (await k.lookup(ROOT, b"f")).st_ino == ino
    assert k.refs[ino] == 4  # create + 3 lookups
    await ops.forget([(ino, 3)])
    assert (await k.getattr(ino)).st_size == 4
    await ops.forget([(ino, 1)])
    del k.refs[ino]
    with fuse_errno(errno.ESTALE):
        await k.getattr(ino)

    # An open handle keeps the inode after the kernel forgot every lookup.
    e = await k.lookup(ROOT, b"f")
    fh = await k.open(e.st_ino)
    await ops.forget([(e.st_ino, 1)])
    del k.refs[e.st_ino]
    assert await k.read(fh) == b"data"
    assert (await k.getattr(e.st_ino)).st_size == 4
    await k.release(fh)
    with fuse_errno(errno.ESTALE):
        await k.getattr(e.st_ino)

    # Entries handed out by readdir are references too.
    await k.mkdir(ROOT, b"d")
    await k.forget_all()
    assert len(ops.inodes) == 1
    listed = await k.listdir(ROOT)
    assert [n for n, _ in listed] == [b"d", b"f"]
    assert len(ops.inodes) == 3
    await k.settle()


@trio_test
async def test_statfs(k: Kernel, ops: Operations) -> None:
    s = await ops.statfs(CTX)
    assert s.f_namemax == MAX_NAME == 255
    assert s.f_bsize > 0 and s.f_blocks > 0
    assert 0 < s.f_ffree <= s.f_files
    await k.write_file(ROOT, b"f", b"")
    assert (await ops.statfs(CTX)).f_ffree == s.f_ffree - 1
    await k.settle()
    assert (await ops.statfs(CTX)).f_ffree == s.f_ffree


# -- files: content, versions, handles -----------------------------------------------------------


@trio_test
async def test_each_flush_of_a_change_is_one_version(k: Kernel, vol: Volume) -> None:
    fh, e = await k.create(ROOT, b"f")
    assert stored(vol, b"f").target == EMPTY_VERSION
    await k.write(fh, 0, b"hello")
    assert await k.read(fh) == b"hello"  # live content before any flush
    assert (await k.getattr(e.st_ino)).st_size == 5

    await k.flush(fh)
    v1 = int(stored(vol, b"f").target)
    assert v1 != EMPTY_VERSION
    assert version(vol, v1).parent == EMPTY_VERSION
    assert version_content(vol, v1) == b"hello"
    assert stored(vol, b"f").size == 5

    await k.flush(fh)  # nothing changed: no new version
    assert stored(vol, b"f").target == v1
    assert version_ids(vol) == [EMPTY_VERSION, v1]

    await k.write(fh, 5, b" world")
    await k.ops.fsync(fh, False)  # fsync commits as flush does
    v2 = int(stored(vol, b"f").target)
    assert v2 not in (EMPTY_VERSION, v1)
    assert version(vol, v2).parent == v1
    assert version_content(vol, v2) == b"hello world"

    await k.write(fh, 0, b"J")
    await k.release(fh)
    v3 = int(stored(vol, b"f").target)
    assert version(vol, v3).parent == v2
    assert version_content(vol, v3) == b"Jello world"

    assert await k.cat(e.st_ino) == b"Jello world"  # open + release without a write
    assert version_ids(vol) == [EMPTY_VERSION, v1, v2, v3]
    assert await k.ops.getxattr(e.st_ino, b"user.annofs.version", CTX) == str(v3).encode()
    await k.settle()


@trio_test
async def test_reads_past_eof_are_short(k: Kernel) -> None:
    ino = await k.write_file(ROOT, b"f", b"0123456789")
    fh = await k.open(ino)
    assert await k.read(fh, 8, 100) == b"89"
    assert await k.read(fh, 10, 100) == b""
    assert await k.read(fh, 1000, 10) == b""
    await k.write(fh, 12, b"x")  # dirty overlay: the same rules
    assert await k.read(fh, 9, 100) == b"9\0\0x"
    assert await k.read(fh, 13, 100) == b""
    await k.release(fh)
    await k.settle()


@trio_test
async def test_two_handles_see_the_same_live_content(k: Kernel, vol: Volume) -> None:
    fh1, e = await k.create(ROOT, b"f")
    fh2 = await k.open(e.st_ino)
    await k.write(fh1, 0, b"abc")
    assert await k.read(fh2) == b"abc"
    await k.write(fh2, 1, b"X")
    assert await k.read(fh1) == b"aXc"

    await k.release(fh1)
    v1 = int(stored(vol, b"f").target)
    assert version_content(vol, v1) == b"aXc"
    assert await k.read(fh2) == b"aXc"  # still open, still the same content
    await k.write(fh2, 3, b"Z")
    assert (await k.getattr(e.st_ino)).st_size == 4
    await k.release(fh2)
    v2 = int(stored(vol, b"f").target)
    assert version(vol, v2).parent == v1
    assert await k.cat(e.st_ino) == b"aXcZ"
    await k.settle()


@trio_test
async def test_open_with_o_trunc_makes_one_version(k: Kernel, vol: Volume) -> None:
    ino = await k.write_file(ROOT, b"f", b"old content")
    v1 = int(stored(vol, b"f").target)
    reader = await k.open(ino, os.O_RDONLY)
    fh = await k.open(ino, os.O_RDWR | os.O_TRUNC)
    assert (await k.getattr(ino)).st_size == 0
    assert await k.read(fh) == b""
    assert await k.read(reader) == b""  # one file, whichever handle
    await k.write(fh, 0, b"new")
    await k.release(fh)
    await k.release(reader)
    v2 = int(stored(vol, b"f").target)
    assert version(vol, v2).parent == v1
    assert version_content(vol, v2) == b"new"
    assert version_ids(vol) == [EMPTY_VERSION, v1, v2]

    # O_TRUNC of an empty file changes nothing.
    fh, e = await k.create(ROOT, b"empty")
    await k.release(fh)
    fh = await k.open(e.st_ino, os.O_WRONLY | os.O_TRUNC)
    await k.release(fh)
    assert stored(vol, b"empty").target == EMPTY_VERSION
    assert version_ids(vol) == [EMPTY_VERSION, v1, v2]
    await k.settle()


@trio_test
async def test_only_a_reader_s_close_skips_the_flush(k: Kernel, ops: Operations) -> None:
    """FOPEN_NOFLUSH on read-only opens (nothing to commit at their close); a writer's
    close, or a truncating open's, still comes as FLUSH and commits."""
    ino = await k.write_file(ROOT, b"f", b"content")
    noflush = {}
    for name, flags in [("rdonly", os.O_RDONLY), ("wronly", os.O_WRONLY),
                        ("rdwr", os.O_RDWR), ("rdonly|trunc", os.O_RDONLY | os.O_TRUNC)]:
        info = await ops.open(ino, flags, CTX)
        noflush[name] = info.noflush
        await k.release(info.fh)
    assert noflush == {"rdonly": True, "wronly": False, "rdwr": False, "rdonly|trunc": False}
    await k.settle()


@trio_test
async def test_reads_from_the_disk_go_to_threads_and_cached_ones_do_not(
        k: Kernel, ops: Operations, vol: Volume) -> None:
    data = random.Random(4).randbytes(3 << 20)
    ino = await k.write_file(ROOT, b"big", data)
    evict_packs(vol)
    fh = await k.open(ino, os.O_RDONLY)
    before = (await stats(ops)).get("disk_reads", 0)
    assert await k.read(fh, 1 << 20, 1 << 20) == data[1 << 20:2 << 20]  # from the disk
    after = (await stats(ops)).get("disk_reads", 0)
    assert after == before + 1
    assert await k.read(fh, 1 << 20, 1 << 20) == data[1 << 20:2 << 20]  # now cached
    assert (await stats(ops)).get("disk_reads", 0) == after
    await k.release(fh)
    await k.settle()


@trio_test
async def test_truncate_without_a_handle(k: Kernel, vol: Volume) -> None:
    data = random.Random(1).randbytes(200_000)
    ino = await k.write_file(ROOT, b"f", data)
    v0 = int(stored(vol, b"f").target)

    e = await k.setattr(ino, size=1000)
    assert e.st_size == 1000
    assert (await k.getattr(ino)).st_size == 1000
    a = stored(vol, b"f")
    assert a.size == 1000
    assert version(vol, int(a.target)).parent == v0
    assert version_content(vol, int(a.target)) == data[:1000]
    v1 = int(a.target)

    assert (await k.setattr(ino, size=5000)).st_size == 5000
    a = stored(vol, b"f")
    assert version(vol, int(a.target)).parent == v1
    assert await k.cat(ino) == data[:1000] + bytes(4000)
    v2 = int(a.target)

    assert (await k.setattr(ino, size=0)).st_size == 0
    a = stored(vol, b"f")
    assert a.size == 0 and version(vol, int(a.target)).parent == v2
    assert await k.cat(ino) == b""
    await k.settle()


@trio_test
async def test_a_truncate_by_path_beside_the_last_release_is_kept(k: Kernel, vol: Volume) -> None:
    """The kernel sends a closed handle's RELEASE after close() returns: a truncate(2) by
    path may come while it is in flight. The truncate took the open file, waited for its
    lock, and the release meanwhile dropped it (nothing dirty yet): the truncated bytes
    went to a file no one committed, and the store kept the old size (seen once under
    tests/t4_reliability_load.py: 6370 bytes read back after a truncate to 5853)."""
    for i in range(20):  # trio shuffles the order of tasks made ready together
        name = f"f{i}".encode()
        ino = await k.write_file(ROOT, name, b"x" * 6370)
        fh = await k.open(ino, os.O_WRONLY)
        await k.write(fh, 4683, b"y" * 1687)
        await k.flush(fh)  # close(): committed; RELEASE not yet answered
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(k.setattr, ino, size=5853))
            n.start_soon(k.release, fh)
        assert stored(vol, name).size == 5853, i
        assert await k.cat(ino) == b"x" * 4683 + b"y" * 1170, i
    await k.settle()


@trio_test
async def test_truncate_through_an_open_handle(k: Kernel, vol: Volume) -> None:
    ino = await k.write_file(ROOT, b"f", b"0123456789")
    fh = await k.open(ino)
    await k.write(fh, 8, b"AB")  # dirty when the truncate comes
    assert (await k.setattr(ino, fh, size=4)).st_size == 4
    assert await k.read(fh) == b"0123"
    # Growing again shows zeros, never the bytes cut off before.
    assert (await k.setattr(ino, fh, size=8)).st_size == 8
    assert await k.read(fh) == b"0123" + bytes(4)
    await k.write(fh, 10, b"Z")
    assert await k.read(fh) == b"0123" + bytes(6) + b"Z"
    assert (await k.getattr(ino)).st_size == 11
    await k.release(fh)
    assert version_content(vol, int(stored(vol, b"f").target)) == b"0123" + bytes(6) + b"Z"
    assert await k.cat(ino) == b"0123" + bytes(6) + b"Z"
    await k.settle()


@trio_test
async def test_sparse_writes(k: Kernel, vol: Volume) -> None:
    fh, e = await k.create(ROOT, b"f")
    await k.write(fh, 3 * MiB, b"end")
    assert (await k.getattr(e.st_ino)).st_size == 3 * MiB + 3
    assert await k.read(fh, 0, 4096) == bytes(4096)
    assert await k.read(fh, 3 * MiB - 2, 10) == b"\0\0end"
    await k.write(fh, MiB, b"mid")
    await k.release(fh)

    expected = bytearray(3 * MiB + 3)
    expected[MiB:MiB + 3] = b"mid"
    expected[3 * MiB:] = b"end"
    assert await k.cat(e.st_ino) == expected
    assert stored(vol, b"f").size == len(expected)
    digest = await k.ops.getxattr(e.st_ino, b"user.annofs.digest", CTX)
    assert digest == b"blake3:" + blake3.blake3(expected).hexdigest().encode()

    # A hole past the end of a committed file.
    fh = await k.open(e.st_ino)
    await k.write(fh, len(expected) + 100_000, b"tail")
    await k.release(fh)
    expected += bytes(100_000) + b"tail"
    assert await k.cat(e.st_ino) == expected
    await k.settle()


PiB = 1 << 50
TiB = 1 << 40


@trio_test
async def test_huge_holes_cost_nothing(k: Kernel, vol: Volume) -> None:
    """A 1 PiB truncate and a write at 1 TiB are O(1): holes in the version, zeros on
    read, st_blocks counting only data, every layer (digest bound, fsck) at ease."""
    import time

    data = random.Random(7).randbytes(300_000)
    ino = await k.write_file(ROOT, b"sparse", data)
    t = time.perf_counter()
    await k.setattr(ino, size=PiB)  # by path: commits at once
    fh = await k.open(ino)
    await k.write(fh, TiB, b"at a tebibyte")
    await k.release(fh)
    assert time.perf_counter() - t < 1.0
    e = await k.getattr(ino)
    assert e.st_size == PiB
    # Data only: 300,000 + 13 bytes of it, whatever the size.
    assert e.st_blocks == (len(data) + 13 + 511) // 512
    fh = await k.open(ino, os.O_RDONLY)
    assert await k.read(fh, len(data) - 10, 20) == data[-10:] + bytes(10)
    assert await k.read(fh, TiB - 3, 20) == bytes(3) + b"at a tebibyte" + bytes(4)
    assert await k.read(fh, PiB - 5, 100) == bytes(5)
    await k.release(fh)
    v = version(vol, int(stored(vol, b"sparse").target))
    assert v.stored_size == len(data) + 13 and v.count < 40
    from annofs.content.versions import TooLargeToHashError
    with pytest.raises(TooLargeToHashError, match="too large to hash"):
        vol.versions.ensure_digest(v)
    with fuse_errno(errno.EFBIG):
        await k.ops.getxattr(ino, b"user.annofs.digest", CTX)
    # Shrinking into the data, and growing a little: a digest again (zeros hashed).
    await k.setattr(ino, size=100)
    await k.setattr(ino, size=5 * MiB)
    got = await k.ops.getxattr(ino, b"user.annofs.digest", CTX)
    assert got == b"blake3:" + blake3.blake3(data[:100] + bytes(5 * MiB - 100)).hexdigest().encode()
    assert (await k.getattr(ino)).st_blocks == 1
    await k.settle()


@trio_test
async def test_sizes_past_the_limit_are_efbig(k: Kernel) -> None:
    """The kernel's own limit for FUSE (MAX_LFS_FILESIZE) is ours: past it, EFBIG."""
    from annofs.content.versions import MAX_FILE_SIZE

    ino = await k.write_file(ROOT, b"f", b"x")
    # (A size past it does not fit pyfuse3's off_t: the kernel cannot send one.)
    fh = await k.open(ino)
    with fuse_errno(errno.EFBIG):
        await k.write(fh, MAX_FILE_SIZE - 1, b"ab")
    await k.write(fh, MAX_FILE_SIZE - 1, b"a")
    await k.release(fh)
    assert (await k.getattr(ino)).st_size == MAX_FILE_SIZE
    await k.settle()


@trio_test
async def test_large_write_then_small_edit_shares_fragments(k: Kernel, vol: Volume) -> None:
    data = random.Random(2).randbytes(5 * MiB // 2)  # > INLINE_BYTES: folded in a thread
    fh, e = await k.create(ROOT, b"big")
    for off in range(0, len(data), 128 * 1024):
        await k.write(fh, off, data[off:off + 128 * 1024])
    await k.release(fh)
    v1 = version(vol, int(stored(vol, b"big").target))
    assert v1.size == len(data) and v1.count >= 8
    assert await k.cat(e.st_ino) == data

    before = await stats(k.ops)
    fh = await k.open(e.st_ino)
    await k.write(fh, MiB, b"EDIT")
    await k.release(fh)
    after = await stats(k.ops)
    assert after["commits"] == before["commits"] + 1
    # The cost of the commit follows the edit, not the file.
    assert 0 < after["rechunked_bytes"] - before["rechunked_bytes"] < len(data) // 4
    v2 = version(vol, int(stored(vol, b"big").target))
    assert v2.parent == v1.id
    edited = data[:MiB] + b"EDIT" + data[MiB + 4:]
    assert await k.cat(e.st_ino) == edited
    # Boundaries resynchronise after an edit: all but a few fragments are kept.
    assert len(set(fragments(v1)) & set(fragments(v2))) >= v1.count - 3
    await k.settle()


@trio_test
async def test_spilled_writes_make_one_version(
        k: Kernel, vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long write is turned into fragments early (bounded memory), without versions."""
    monkeypatch.setattr("annofs.fs.operations.SPILL_BYTES", 200 * 1024)
    rng = random.Random(3)
    old = rng.randbytes(50_000)
    ino = await k.write_file(ROOT, b"f", old)
    v0 = int(stored(vol, b"f").target)
    data = rng.randbytes(MiB)
    fh = await k.open(ino)
    for off in range(0, len(data), 64 * 1024):
        await k.write(fh, off, data[off:off + 64 * 1024])
    assert await k.read(fh, 300_000, 1000) == data[300_000:301_000]
    await k.setattr(ino, fh, size=700_000)  # cuts into what was spilled
    await k.write(fh, 800_000, b"after the hole")
    expected = data[:700_000] + bytes(100_000) + b"after the hole"
    assert await k.read(fh) == expected
    assert version_ids(vol) == [EMPTY_VERSION, v0]  # nothing committed yet
    await k.release(fh)
    v1 = int(stored(vol, b"f").target)
    assert version_ids(vol) == [EMPTY_VERSION, v0, v1]
    assert version(vol, v1).parent == v0
    assert version_content(vol, v1) == expected
    await k.settle()


@trio_test
async def test_gc_during_a_spilled_write_keeps_its_fragments(
        k: Kernel, vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc between a spill and the close must not free what the close will refer to."""
    from annofs.maintenance.gc import collect

    monkeypatch.setattr("annofs.fs.operations.SPILL_BYTES", 200 * 1024)
    data = random.Random(8).randbytes(MiB)
    ino = await k.write_file(ROOT, b"f", b"")
    fh = await k.open(ino)
    for off in range(0, len(data), 64 * 1024):
        await k.write(fh, off, data[off:off + 64 * 1024])
    assert k.ops.unstored_fragments()  # spilled: fragments stored, no version yet
    collect(vol, extra_roots=k.ops.held_versions(), keep_fragments=k.ops.unstored_fragments())
    await k.release(fh)
    assert version_content(vol, int(stored(vol, b"f").target)) == data
    await k.settle()


async def during_a_threaded_flush(
        k: Kernel, name: bytes, seed: int,
        meanwhile: Callable[[int, bytes], Awaitable[None]]) -> tuple[int, int, bytes]:
    """A file `name` holding 2 MiB written through one handle (fh1) and open on a second
    (fh2); fh1 is flushed, and `meanwhile(fh2, data)` runs while that commit folds in its
    worker thread (more than INLINE_BYTES), holding the file's lock. Returns fh1, fh2 and
    the data."""
    data = random.Random(seed).randbytes(2 * MiB)
    fh1, e = await k.create(ROOT, name)
    fh2 = await k.open(e.st_ino)
    await k.write(fh1, 0, data)

    async def then() -> None:
        await trio.testing.wait_all_tasks_blocked()  # the flush is folding in its thread
        await meanwhile(fh2, data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.flush, fh1)
        nursery.start_soon(then)
    return fh1, fh2, data


@trio_test
async def test_write_during_a_threaded_commit_is_not_lost(k: Kernel, vol: Volume) -> None:
    seen: list[bytes] = []

    async def late_writer(fh2: int, _data: bytes) -> None:
        await k.write(fh2, 0, b"LATE")
        seen.append(await k.read(fh2, 0, 8))

    fh1, fh2, data = await during_a_threaded_flush(k, b"f", 4, late_writer)
    expected = b"LATE" + data[4:]
    assert seen == [expected[:8]]
    assert await k.read(fh1) == expected
    await k.release(fh1)
    await k.release(fh2)
    final = version(vol, int(stored(vol, b"f").target))
    assert version_content(vol, final.id) == expected
    assert version_content(vol, final.parent) == data  # the commit the write waited for
    await k.settle()


@trio_test
async def test_a_read_never_overtakes_a_write_received_before_it(k: Kernel, vol: Volume) -> None:
    """The kernel may send a READ while a WRITE it sent before waits for the file's lock
    (a commit holds it). The READ must carry that write's bytes: the kernel caches what
    it returns as up to date, under a size that soon counts the write (a reader of a log
    being appended saw zeros where the last record was; tests/t4_fuse_tools.py)."""
    seen: list[bytes] = []

    async def append_then_read(fh2: int, data: bytes) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(k.write, fh2, len(data), b"APPENDED")
            await trio.testing.wait_all_tasks_blocked()  # the write waits for the lock
            seen.append(await k.read(fh2, len(data) - 4, 12))

    fh1, fh2, data = await during_a_threaded_flush(k, b"log", 5, append_then_read)
    assert seen == [data[-4:] + b"APPENDED"]
    await k.release(fh1)
    await k.release(fh2)
    assert version_content(vol, int(stored(vol, b"log").target)) == data + b"APPENDED"
    await k.settle()


# -- directories -----------------------------------------------------------------------------------


@trio_test
async def test_mkdir_rmdir_unlink(k: Kernel, vol: Volume) -> None:
    before = await k.getattr(ROOT)
    d = await k.mkdir(ROOT, b"d", 0o750)
    assert stat.S_ISDIR(d.st_mode) and d.st_nlink == 2
    root = await k.getattr(ROOT)
    assert root.st_nlink == 3
    assert root.st_mtime_ns > before.st_mtime_ns

    with fuse_errno(errno.EEXIST):
        await k.mkdir(ROOT, b"d")
    ino = await k.write_file(d.st_ino, b"f", b"x")
    with fuse_errno(errno.EEXIST):
        await k.create(ROOT, b"d")
    with fuse_errno(errno.ENOTEMPTY):
        await k.rmdir(ROOT, b"d")
    with fuse_errno(errno.ENOTDIR):
        await k.rmdir(d.st_ino, b"f")
    with fuse_errno(errno.EISDIR):
        await k.unlink(ROOT, b"d")
    with fuse_errno(errno.ENOENT):
        await k.rmdir(ROOT, b"missing")
    with fuse_errno(errno.ENOENT):
        await k.unlink(ROOT, b"missing")
    assert stored_names(vol, b"d") == [b"f"]

    await k.unlink(d.st_ino, b"f")
    with fuse_errno(errno.ENOENT):
        await k.lookup(d.st_ino, b"f")
    assert (await k.getattr(ino)).st_nlink == 0  # still known to the kernel: an orphan
    await k.rmdir(ROOT, b"d")
    with fuse_errno(errno.ENOENT):
        await k.lookup(ROOT, b"d")
    assert (await k.getattr(ROOT)).st_nlink == 2
    assert (await k.getattr(d.st_ino)).st_nlink == 0
    # Nothing can be made inside a removed directory.
    with fuse_errno(errno.ENOENT):
        await k.mkdir(d.st_ino, b"x")
    assert stored_names(vol) == []
    await k.settle()


@trio_test
async def test_setgid_directory_passes_on_its_group(k: Kernel) -> None:
    d = await k.mkdir(ROOT, b"d")
    e = await k.setattr(d.st_ino, mode=stat.S_IFDIR | 0o2775, gid=777)
    assert e.st_mode & stat.S_ISGID and e.st_gid == 777
    fh, f = await k.create(d.st_ino, b"f")
    await k.release(fh)
    assert f.st_gid == 777 and not f.st_mode & stat.S_ISGID
    s = await k.mkdir(d.st_ino, b"s")
    assert s.st_gid == 777 and s.st_mode & stat.S_ISGID
    other = await k.mkdir(ROOT, b"other")
    assert other.st_gid == CTX.gid
    await k.settle()


# -- readdir ---------------------------------------------------------------------------------------


@trio_test
async def test_readdir_lists_entries_with_their_attributes(k: Kernel) -> None:
    await k.write_file(ROOT, b"b-file", b"12345")
    await k.mkdir(ROOT, b"a-dir")
    await k.symlink(ROOT, b"c-link", b"b-file")
    await k.forget_all()
    listed = await k.listdir(ROOT)
    assert [n for n, _ in listed] == [b"a-dir", b"b-file", b"c-link"]
    by_name = dict(listed)
    assert stat.S_ISDIR(by_name[b"a-dir"].st_mode)
    assert stat.S_ISREG(by_name[b"b-file"].st_mode) and by_name[b"b-file"].st_size == 5
    assert stat.S_ISLNK(by_name[b"c-link"].st_mode)
    for name, e in listed:
        assert (await k.lookup(ROOT, name)).st_ino == e.st_ino
    assert await k.listdir((await k.lookup(ROOT, b"a-dir")).st_ino) == []
    await k.settle()


@trio_test
async def test_readdir_resumes_from_next_id(k: Kernel) -> None:
    names = [b"e%02d" % i for i in range(25)]
    for n in names:
        await k.write_file(ROOT, n, b"")
    for budget in (1, 4, 7, None):
        assert await k.names(ROOT) == names
        got = [n for n, _ in await k.listdir(ROOT, budget)]
        assert got == names, f"budget {budget}"

    # next_ids strictly increase, and a call resumed at one returns what follows it.
    fh = await k.ops.opendir(ROOT, CTX)
    first = await k.readdir_page(fh, 0, 10)
    ids = [i for _, _, i in first]
    assert ids == sorted(set(ids))
    again = await k.readdir_page(fh, ids[4], 3)
    assert [n for n, _, _ in again] == names[5:8]
    rest = await k.readdir_page(fh, ids[-1], None)
    assert [n for n, _, _ in rest] == names[10:]
    assert await k.readdir_page(fh, rest[-1][2], None) == []
    await k.ops.releasedir(fh)
    await k.settle()


@trio_test
async def test_readdir_resumes_while_the_directory_changes(k: Kernel) -> None:
    """POSIX: an entry present for the whole listing appears exactly once; one added or
    removed meanwhile may or may not appear, but never twice."""
    original = [b"e%02d" % i for i in range(20)]
    for n in original:
        await k.write_file(ROOT, n, b"")
    fh = await k.ops.opendir(ROOT, CTX)
    seen = [n for n, _, _ in await k.readdir_page(fh, 0, 5)]
    start = 5
    assert seen == original[:5]
    removed = {b"e02", b"e10", b"e19"}  # one already listed, two not yet
    created = {b"a-first", b"e10b", b"zz-last"}
    for n in sorted(removed):
        await k.unlink(ROOT, n)
    for n in sorted(created):
        await k.write_file(ROOT, n, b"")
    while page := await k.readdir_page(fh, start, 5):
        seen += [n for n, _, _ in page]
        start = page[-1][2]
        if b"e12" in seen and b"e13" not in seen:
            await k.unlink(ROOT, b"e13")  # removed in the middle of the listing too
            removed.add(b"e13")
    await k.ops.releasedir(fh)

    counts = Counter(seen)
    assert [n for n, c in counts.items() if c > 1] == []
    throughout = set(original) - removed
    assert throughout <= set(seen), f"skipped: {sorted(throughout - set(seen))}"
    assert set(seen) <= set(original) | created
    # A new listing shows exactly the directory as it now is.
    assert await k.names(ROOT) == sorted(throughout | created)
    await k.settle()


@trio_test
async def test_resumed_readdir_does_not_serve_stale_entries(k: Kernel) -> None:
    for i in range(10):
        await k.write_file(ROOT, b"e%02d" % i, b"")
    fh = await k.ops.opendir(ROOT, CTX)
    page = await k.readdir_page(fh, 0, 3)
    await k.unlink(ROOT, b"e05")
    ino = (await k.lookup(ROOT, b"e07")).st_ino
    await k.setattr(ino, size=4096, mode=stat.S_IFREG | 0o600)
    rest = await k.readdir_page(fh, page[-1][2], None)
    await k.ops.releasedir(fh)
    by_name = {n: e for n, e, _ in rest}
    try:
        assert b"e05" not in by_name, "a removed name was returned"
        assert by_name[b"e07"].st_size == 4096, "attributes from before the change"
        assert stat.S_IMODE(by_name[b"e07"].st_mode) == 0o600
    finally:
        await k.forget_all()


# -- rename ----------------------------------------------------------------------------------------


@trio_test
async def test_rename_over_a_file(k: Kernel, vol: Volume) -> None:
    a = await k.write_file(ROOT, b"a", b"AAA")
    b = await k.write_file(ROOT, b"b", b"BBBB")
    fh_b = await k.open(b)
    await k.rename(ROOT, b"a", ROOT, b"b")
    assert (await k.lookup(ROOT, b"b")).st_ino == a
    with fuse_errno(errno.ENOENT):
        await k.lookup(ROOT, b"a")
    assert await k.cat(a) == b"AAA"
    assert version_content(vol, int(stored(vol, b"b").target)) == b"AAA"
    # The replaced file lives on through its handle, nameless.
    assert (await k.getattr(b)).st_nlink == 0
    assert await k.read(fh_b) == b"BBBB"
    await k.write(fh_b, 0, b"bb")
    await k.release(fh_b)  # must not land in the file now called b
    assert await k.cat(a) == b"AAA"
    assert stored_names(vol) == [b"b"]
    await k.settle()


@trio_test
async def test_rename_a_directory_over_an_empty_one(k: Kernel, vol: Volume) -> None:
    src = await k.mkdir(ROOT, b"src")
    dst = await k.mkdir(ROOT, b"dst")
    await k.write_file(src.st_ino, b"f", b"inside")
    assert (await k.getattr(ROOT)).st_nlink == 4
    await k.rename(ROOT, b"src", ROOT, b"dst")
    assert (await k.lookup(ROOT, b"dst")).st_ino == src.st_ino
    assert (await k.getattr(ROOT)).st_nlink == 3
    assert (await k.getattr(dst.st_ino)).st_nlink == 0
    assert stored_names(vol) == [b"dst"]
    assert stored_names(vol, b"dst") == [b"f"]
    # The moved directory's inode now means the new path.
    await k.write_file(src.st_ino, b"g", b"")
    assert stored_names(vol, b"dst") == [b"f", b"g"]
    await k.settle()


@trio_test
async def test_rename_moves_an_open_file_and_a_directory_with_open_files(
        k: Kernel, vol: Volume) -> None:
    d = await k.mkdir(ROOT, b"d")
    fh, f = await k.create(d.st_ino, b"f")
    await k.write(fh, 0, b"written before the moves")
    await k.rename(d.st_ino, b"f", d.st_ino, b"g")
    await k.rename(ROOT, b"d", ROOT, b"e")
    other = await k.mkdir(ROOT, b"other")
    await k.rename(ROOT, b"e", other.st_ino, b"e2")
    await k.release(fh)
    assert stored_names(vol) == [b"other"]
    assert stored_names(vol, b"other") == [b"e2"]
    assert version_content(vol, int(stored(vol, b"other", b"e2", b"g").target)) == \
        b"written before the moves"
    assert (await k.lookup(other.st_ino, b"e2")).st_ino == d.st_ino
    assert (await k.lookup(d.st_ino, b"g")).st_ino == f.st_ino
    await k.settle()


@trio_test
async def test_rename_errors_change_nothing(k: Kernel, vol: Volume) -> None:
    a = await k.mkdir(ROOT, b"a")
    b = await k.mkdir(a.st_ino, b"b")
    await k.write_file(ROOT, b"f", b"F")
    await k.write_file(ROOT, b"g", b"G")
    await k.mkdir(ROOT, b"empty")
    n = await k.mkdir(ROOT, b"full")
    await k.write_file(n.st_ino, b"x", b"")
    before = stored_names(vol)

    with fuse_errno(errno.ENOTEMPTY):
        await k.rename(ROOT, b"empty", ROOT, b"full")
    with fuse_errno(errno.ENOTDIR):
        await k.rename(ROOT, b"a", ROOT, b"f")
    with fuse_errno(errno.EISDIR):
        await k.rename(ROOT, b"f", ROOT, b"empty")
    with fuse_errno(errno.EINVAL):
        await k.rename(ROOT, b"a", b.st_ino, b"a")
    with fuse_errno(errno.EINVAL):
        await k.rename(ROOT, b"a", a.st_ino, b"a")
    with fuse_errno(errno.EEXIST):
        await k.rename(ROOT, b"f", ROOT, b"g", pyfuse3.RENAME_NOREPLACE)
    with fuse_errno(errno.ENOENT):
        await k.rename(ROOT, b"missing", ROOT, b"h")
    with fuse_errno(errno.ENOENT):
        await k.rename(ROOT, b"f", ROOT, b"missing", pyfuse3.RENAME_EXCHANGE)
    with fuse_errno(errno.EINVAL):
        await k.rename(ROOT, b"a", a.st_ino, b"b", pyfuse3.RENAME_EXCHANGE)
    assert stored_names(vol) == before
    assert stored_names(vol, b"a") == [b"b"]
    assert stored_names(vol, b"full") == [b"x"]
    assert version_content(vol, int(stored(vol, b"g").target)) == b"G"

    await k.rename(ROOT, b"f", ROOT, b"f")  # onto itself: nothing happens
    await k.rename(ROOT, b"f", ROOT, b"h", pyfuse3.RENAME_NOREPLACE)
    assert stored_names(vol) == sorted({*before, b"h"} - {b"f"})
    await k.settle()


@trio_test
async def test_rename_exchange_of_a_file_and_a_directory(k: Kernel, vol: Volume) -> None:
    f = await k.write_file(ROOT, b"f", b"F")
    d = await k.mkdir(ROOT, b"d")
    x = await k.mkdir(d.st_ino, b"x")
    await k.write_file(x.st_ino, b"inner", b"I")
    fh = await k.open(f)
    await k.write(fh, 1, b"G")  # uncommitted when the names swap

    await k.rename(ROOT, b"f", d.st_ino, b"x", pyfuse3.RENAME_EXCHANGE)
    now_f = await k.lookup(ROOT, b"f")
    now_x = await k.lookup(d.st_ino, b"x")
    assert now_f.st_ino == x.st_ino and stat.S_ISDIR(now_f.st_mode)
    assert now_x.st_ino == f and stat.S_ISREG(now_x.st_mode)
    assert (await k.getattr(ROOT)).st_nlink == 4  # d and f are directories now
    assert (await k.getattr(d.st_ino)).st_nlink == 2
    assert stored_names(vol, b"f") == [b"inner"]

    await k.release(fh)
    assert version_content(vol, int(stored(vol, b"d", b"x").target)) == b"FG"
    assert stored(vol, b"f").is_dir
    await k.write_file(x.st_ino, b"new", b"")  # the directory's inode means /f now
    assert stored_names(vol, b"f") == [b"inner", b"new"]
    await k.settle()


# -- hard links, symlinks, special files -----------------------------------------------------------


@trio_test
async def test_hard_links_share_content(k: Kernel, vol: Volume) -> None:
    f = await k.write_file(ROOT, b"f", b"one")
    d = await k.mkdir(ROOT, b"d")
    assert (await k.link(f, ROOT, b"g")).st_ino == f
    assert (await k.link(f, d.st_ino, b"h")).st_ino == f
    assert (await k.lookup(ROOT, b"g")).st_ino == f
    assert (await k.lookup(d.st_ino, b"h")).st_ino == f

    fh = await k.open(f)
    await k.write(fh, 0, b"ONE, changed")
    await k.release(fh)
    for path in ((b"f",), (b"g",), (b"d", b"h")):
        assert version_content(vol, int(stored(vol, *path).target)) == b"ONE, changed"
    await k.ops.setxattr(f, b"user.k", b"v", CTX)
    assert stored(vol, b"d", b"h").xattrs == {b"user.k": b"v"}

    await k.unlink(ROOT, b"f")
    with fuse_errno(errno.ENOENT):
        await k.lookup(ROOT, b"f")
    assert await k.cat(f) == b"ONE, changed"
    assert version_content(vol, int(stored(vol, b"g").target)) == b"ONE, changed"
    await k.unlink(d.st_ino, b"h")
    assert (await k.getattr(f)).st_size == len(b"ONE, changed")

    with fuse_errno(errno.EPERM):
        await k.link(d.st_ino, ROOT, b"dirlink")
    with fuse_errno(errno.EEXIST):
        await k.link(f, ROOT, b"d")
    # Two names of one file: renaming one onto the other does nothing (POSIX).
    await k.link(f, ROOT, b"g2")
    await k.rename(ROOT, b"g", ROOT, b"g2")
    assert stored_names(vol) == [b"d", b"g", b"g2"]
    await k.settle()


@trio_test
async def test_hard_link_nlink(k: Kernel) -> None:
    f = await k.write_file(ROOT, b"f", b"x")
    try:
        await k.link(f, ROOT, b"g")
        assert (await k.lookup(ROOT, b"g")).st_nlink == 2
        assert (await k.getattr(f)).st_nlink == 2
        assert (await k.link(f, ROOT, b"h")).st_nlink == 3
        assert (await k.setattr(f, mode=0o600)).st_nlink == 3
        assert dict(await k.listdir(ROOT))[b"f"].st_nlink == 3
        await k.unlink(ROOT, b"g")
        await k.unlink(ROOT, b"h")
        assert (await k.getattr(f)).st_nlink == 1
    finally:
        await k.forget_all()


@trio_test
async def test_new_file_at_a_renamed_hard_link_name_is_a_new_file(k: Kernel) -> None:
    f = await k.write_file(ROOT, b"f", b"FFFF")
    await k.link(f, ROOT, b"g")
    await k.rename(ROOT, b"g", ROOT, b"h")  # ln f g; mv g h; echo GG > g
    fh, g = await k.create(ROOT, b"g")
    await k.write(fh, 0, b"GG")
    await k.release(fh)
    try:
        assert await k.cat(f) == b"FFFF"
        assert g.st_ino != f
    finally:
        await k.forget_all()


@trio_test
async def test_symlink_and_readlink(k: Kernel, vol: Volume) -> None:
    target = b"../some/where \xff"
    e = await k.symlink(ROOT, b"l", target)
    assert stat.S_ISLNK(e.st_mode) and e.st_size == len(target)
    assert (await k.lookup(ROOT, b"l")).st_ino == e.st_ino
    assert await k.ops.readlink(e.st_ino, CTX) == target
    assert stored(vol, b"l").target == target
    f = await k.write_file(ROOT, b"f", b"")
    with fuse_errno(errno.EINVAL):
        await k.ops.readlink(f, CTX)
    with fuse_errno(errno.EEXIST):
        await k.symlink(ROOT, b"f", b"x")
    await k.settle()


@trio_test
async def test_mknod(k: Kernel, vol: Volume) -> None:
    fifo = await k.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o640)
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640
    assert fifo.st_rdev == 0 and fifo.st_size == 0
    assert stat.S_ISFIFO((await k.lookup(ROOT, b"fifo")).st_mode)
    assert stat.S_ISFIFO(stored(vol, b"fifo").mode)

    dev = os.makedev(1, 3)
    chr_ = await k.mknod(ROOT, b"null", stat.S_IFCHR | 0o666, dev)
    assert stat.S_ISCHR(chr_.st_mode) and chr_.st_rdev == dev
    assert (await k.getattr(chr_.st_ino)).st_rdev == dev

    reg = await k.mknod(ROOT, b"reg", stat.S_IFREG | 0o600)
    assert stat.S_ISREG(reg.st_mode)
    fh = await k.open(reg.st_ino)
    await k.write(fh, 0, b"regular")
    await k.release(fh)
    assert await k.cat(reg.st_ino) == b"regular"

    sock = await k.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o600)  # what bind() asks for
    assert stat.S_ISSOCK(sock.st_mode) and (await k.getattr(sock.st_ino)).st_size == 0
    with fuse_errno(errno.EEXIST):
        await k.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600)
    assert stored_names(vol) == [b"fifo", b"null", b"reg", b"sock"]
    await k.settle()


# -- attributes ------------------------------------------------------------------------------------


@trio_test
async def test_setattr_mode_owner_times(k: Kernel, vol: Volume) -> None:
    ino = await k.write_file(ROOT, b"f", b"x")
    ctime0 = (await k.getattr(ino)).st_ctime_ns
    e = await k.setattr(ino, mode=stat.S_IFDIR | 0o4700)  # the type bits are ignored
    assert stat.S_ISREG(e.st_mode) and stat.S_IMODE(e.st_mode) == 0o4700
    assert e.st_ctime_ns > ctime0
    e = await k.setattr(ino, uid=4242, gid=4343)
    assert (e.st_uid, e.st_gid) == (4242, 4343)
    e = await k.setattr(ino, atime_ns=1_000_000_000_123, mtime_ns=2_000_000_000_456)
    assert (e.st_atime_ns, e.st_mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)
    got = await k.getattr(ino)
    assert (got.st_mode, got.st_uid, got.st_gid, got.st_atime_ns, got.st_mtime_ns) == \
        (e.st_mode, 4242, 4343, 1_000_000_000_123, 2_000_000_000_456)
    a = stored(vol, b"f")
    assert (a.mode, a.uid, a.gid, a.mtime_ns) == (e.st_mode, 4242, 4343, 2_000_000_000_456)

    # A clean open handle does not disturb an explicit mtime either.
    fh = await k.open(ino)
    await k.setattr(ino, fh, mtime_ns=3_000_000_000_000)
    await k.release(fh)
    assert (await k.getattr(ino)).st_mtime_ns == 3_000_000_000_000

    assert stat.S_IMODE((await k.setattr(ROOT, mode=0o700)).st_mode) == 0o700
    assert stat.S_IMODE((await k.getattr(ROOT)).st_mode) == 0o700
    # A write sets mtime to now.
    fh = await k.open(ino)
    await k.write(fh, 0, b"y")
    await k.release(fh)
    assert (await k.getattr(ino)).st_mtime_ns > 3_000_000_000_000
    await k.settle()


@trio_test
async def test_mtime_set_before_close_survives_the_close(k: Kernel, vol: Volume) -> None:
    """cp -p and tar: write, futimens on the still-open descriptor, then close."""
    fh, e = await k.create(ROOT, b"f")
    await k.write(fh, 0, b"copied bytes")
    await k.setattr(e.st_ino, fh, mtime_ns=1_500_000_000_000_000_000)
    assert (await k.getattr(e.st_ino)).st_mtime_ns == 1_500_000_000_000_000_000
    await k.release(fh)
    assert (await k.getattr(e.st_ino)).st_mtime_ns == 1_500_000_000_000_000_000
    assert stored(vol, b"f").mtime_ns == 1_500_000_000_000_000_000
    assert await k.cat(e.st_ino) == b"copied bytes"
    # A write after the explicit time is a new modification.
    fh = await k.open(e.st_ino)
    await k.setattr(e.st_ino, fh, mtime_ns=1_000)
    await k.write(fh, 0, b"C")
    await k.release(fh)
    assert (await k.getattr(e.st_ino)).st_mtime_ns > 1_500_000_000_000_000_000
    await k.settle()


@trio_test
async def test_mtime_of_zero_set_before_close_survives_the_close(k: Kernel) -> None:
    fh, e = await k.create(ROOT, b"f")
    await k.write(fh, 0, b"reproducible build output")
    await k.setattr(e.st_ino, fh, mtime_ns=0)
    await k.release(fh)
    try:
        assert (await k.getattr(e.st_ino)).st_mtime_ns == 0
    finally:
        await k.forget_all()


# -- extended attributes ---------------------------------------------------------------------------


@trio_test
async def test_xattrs(k: Kernel, vol: Volume) -> None:
    ops = k.ops
    ino = await k.write_file(ROOT, b"f", b"data")
    ctime0 = (await k.getattr(ino)).st_ctime_ns
    await ops.setxattr(ino, b"user.k", b"v\0binary", CTX)
    await ops.setxattr(ino, b"user.empty", b"", CTX)
    assert (await k.getattr(ino)).st_ctime_ns > ctime0
    assert await ops.getxattr(ino, b"user.k", CTX) == b"v\0binary"
    assert await ops.getxattr(ino, b"user.empty", CTX) == b""
    assert stored(vol, b"f").xattrs == {b"user.k": b"v\0binary", b"user.empty": b""}
    # The computed user.annofs.* are readable but not listed (cp -a would copy them).
    assert sorted(await ops.listxattr(ino, CTX)) == [b"user.empty", b"user.k"]
    await ops.setxattr(ino, b"user.k", b"replaced", CTX)
    assert await ops.getxattr(ino, b"user.k", CTX) == b"replaced"

    with fuse_errno(pyfuse3.ENOATTR):
        await ops.getxattr(ino, b"user.missing", CTX)
    with fuse_errno(pyfuse3.ENOATTR):
        await ops.removexattr(ino, b"user.missing", CTX)
    await ops.removexattr(ino, b"user.k", CTX)
    with fuse_errno(pyfuse3.ENOATTR):
        await ops.getxattr(ino, b"user.k", CTX)
    assert stored(vol, b"f").xattrs == {b"user.empty": b""}

    # annofs's own attributes: computed, never written.
    assert await ops.getxattr(ino, b"user.annofs.digest", CTX) == \
        b"blake3:" + blake3.blake3(b"data").hexdigest().encode()
    for name in (b"user.annofs.digest", b"user.annofs.version", b"user.annofs.new"):
        with fuse_errno(errno.EPERM):
            await ops.setxattr(ino, name, b"x", CTX)
        with fuse_errno(errno.EPERM):
            await ops.removexattr(ino, name, CTX)
    with fuse_errno(pyfuse3.ENOATTR):
        await ops.getxattr(ino, b"user.annofs.new", CTX)

    # Only user.* is stored.
    for name in (b"security.selinux", b"trusted.x", b"system.posix_acl_access"):
        with fuse_errno(errno.EOPNOTSUPP):
            await ops.setxattr(ino, name, b"x", CTX)
        with fuse_errno(errno.EOPNOTSUPP):
            await ops.getxattr(ino, name, CTX)
        with fuse_errno(errno.EOPNOTSUPP):
            await ops.removexattr(ino, name, CTX)

    await ops.setxattr(ino, b"user.big", bytes(64 * 1024), CTX)
    with fuse_errno(errno.E2BIG):
        await ops.setxattr(ino, b"user.big", bytes(64 * 1024 + 1), CTX)
    with fuse_errno(errno.ERANGE):
        await ops.setxattr(ino, b"user." + b"n" * 251, b"x", CTX)

    # Directories, the root: user attributes only, no computed ones.
    d = await k.mkdir(ROOT, b"d")
    await ops.setxattr(d.st_ino, b"user.d", b"dir", CTX)
    assert await ops.listxattr(d.st_ino, CTX) == [b"user.d"]
    with fuse_errno(pyfuse3.ENOATTR):
        await ops.getxattr(d.st_ino, b"user.annofs.version", CTX)
    await ops.setxattr(ROOT, b"user.r", b"root", CTX)
    assert await ops.getxattr(ROOT, b"user.r", CTX) == b"root"
    with vol.store.read() as txn:
        assert vol.namespace.root(txn).xattrs == {b"user.r": b"root"}
    await k.settle()


@trio_test
async def test_digest_xattr_covers_unflushed_writes(k: Kernel) -> None:
    fh, e = await k.create(ROOT, b"f")
    await k.write(fh, 0, b"not yet flushed")
    digest = await k.ops.getxattr(e.st_ino, b"user.annofs.digest", CTX)
    assert digest == b"blake3:" + blake3.blake3(b"not yet flushed").hexdigest().encode()
    await k.release(fh)
    await k.settle()


# -- names -----------------------------------------------------------------------------------------


@trio_test
async def test_names_of_255_and_256_bytes(k: Kernel, vol: Volume) -> None:
    n255, n256 = b"n" * 255, b"n" * 256
    ino = await k.write_file(ROOT, n255, b"x")
    assert (await k.lookup(ROOT, n255)).st_ino == ino
    d = await k.mkdir(ROOT, b"d" * 255)
    await k.symlink(ROOT, b"s" * 255, b"t")
    await k.link(ino, ROOT, b"l" * 255)
    await k.rename(ROOT, b"s" * 255, d.st_ino, b"r" * 255)
    before = stored_names(vol)
    assert before == [b"d" * 255, b"l" * 255, n255]

    with fuse_errno(errno.ENAMETOOLONG):
        await k.lookup(ROOT, n256)
    with fuse_errno(errno.ENAMETOOLONG):
        await k.create(ROOT, n256)
    with fuse_errno(errno.ENAMETOOLONG):
        await k.mkdir(ROOT, n256)
    with fuse_errno(errno.ENAMETOOLONG):
        await k.mknod(ROOT, n256, stat.S_IFIFO | 0o600)
    with fuse_errno(errno.ENAMETOOLONG):
        await k.symlink(ROOT, n256, b"t")
    with fuse_errno(errno.ENAMETOOLONG):
        await k.link(ino, ROOT, n256)
    with fuse_errno(errno.ENAMETOOLONG):
        await k.rename(ROOT, n255, ROOT, n256)
    assert stored_names(vol) == before
    assert stored_names(vol, b"d" * 255) == [b"r" * 255]
    assert [n for n, _ in await k.listdir(ROOT)] == before
    await k.settle()


# -- open files without a name ---------------------------------------------------------------------


@trio_test
async def test_unlinked_open_file_keeps_working(k: Kernel, vol: Volume) -> None:
    ino = await k.write_file(ROOT, b"f", b"abc")
    fh = await k.open(ino)
    versions_before = version_ids(vol)
    await k.unlink(ROOT, b"f")
    with fuse_errno(errno.ENOENT):
        await k.lookup(ROOT, b"f")
    e = await k.getattr(ino)
    assert e.st_nlink == 0 and e.st_size == 3
    assert await k.read(fh) == b"abc"
    await k.write(fh, 3, b"def")
    assert await k.read(fh) == b"abcdef"
    assert (await k.getattr(ino)).st_size == 6
    await k.flush(fh)
    assert (await k.getattr(ino)).st_size == 6
    await k.setattr(ino, fh, size=2)
    assert await k.read(fh) == b"ab"
    assert (await k.getattr(ino)).st_size == 2

    with fuse_errno(errno.ENOENT):  # no name to link from
        await k.link(ino, ROOT, b"back")
    # A new file under the old name is another file.
    fh2, new = await k.create(ROOT, b"f")
    assert new.st_ino != ino
    await k.write(fh2, 0, b"new")
    await k.release(fh2)
    assert await k.read(fh) == b"ab"
    await k.write(fh, 0, b"AB")
    await k.release(fh)
    assert await k.cat(new.st_ino) == b"new"
    # A nameless file's bytes make no version.
    assert len(version_ids(vol)) == len(versions_before) + 1
    assert stored_names(vol) == [b"f"]
    await k.settle()


@trio_test
async def test_unlinked_never_flushed_file(k: Kernel, vol: Volume) -> None:
    fh, e = await k.create(ROOT, b"tmp")
    await k.write(fh, 0, b"scratch")
    await k.unlink(ROOT, b"tmp")
    assert await k.read(fh) == b"scratch"
    assert (await k.getattr(e.st_ino)).st_nlink == 0
    await k.release(fh)
    assert version_ids(vol) == [EMPTY_VERSION]
    await k.settle()


# -- errors from inside the handlers ---------------------------------------------------------------


@pytest.mark.expected_log(r"^lookup: unexpected error$")
@trio_test
async def test_unexpected_exception_becomes_eio_and_is_logged(
        k: Kernel, ops: Operations, caplog: pytest.LogCaptureFixture) -> None:
    ino = await k.write_file(ROOT, b"f", b"")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops.ns, "get", broken)
        with fuse_errno(errno.EIO):
            await k.lookup(ROOT, b"f")
    records = [r for r in caplog.records if r.getMessage() == "lookup: unexpected error"]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)
    # The filesystem goes on.
    assert (await k.lookup(ROOT, b"f")).st_ino == ino
    await k.settle()


@pytest.mark.expected_log(r"^statfs: unexpected OS error$")
@trio_test
async def test_unexpected_os_error_keeps_its_errno(ops: Operations) -> None:
    def full(path: object) -> None:
        raise OSError(errno.ENOSPC, "injected")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "statvfs", full)
        with fuse_errno(errno.ENOSPC):
            await ops.statfs(CTX)
    assert (await ops.statfs(CTX)).f_namemax == MAX_NAME


@pytest.mark.expected_log(r"^mkdir: unexpected error$")
@trio_test
async def test_failed_handler_leaves_the_store_unchanged(
        k: Kernel, ops: Operations, vol: Volume) -> None:
    await k.mkdir(ROOT, b"before")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected after the entry was made")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops.ns, "set_root_attrs", broken)  # the parent's mtime update
        with fuse_errno(errno.EIO):
            await k.mkdir(ROOT, b"half")
    assert stored_names(vol) == [b"before"]
    with fuse_errno(errno.ENOENT):
        await k.lookup(ROOT, b"half")
    assert (await k.getattr(ROOT)).st_nlink == 3
    await k.mkdir(ROOT, b"half")
    assert stored_names(vol) == [b"before", b"half"]
    await k.settle()


@pytest.mark.expected_log(r"^read: fragment [0-9a-f]+: content does not match its hash$")
@trio_test
async def test_corrupt_fragment_reads_as_eio(k: Kernel, vol: Volume) -> None:
    ino = await k.write_file(ROOT, b"f", b"precious bytes")
    v = version(vol, int(stored(vol, b"f").target))
    h = v.fragment_hash(0)
    undo = damage(vol, h, "bit-flip")
    try:
        fh = await k.open(ino)
        with fuse_errno(errno.EIO):
            await k.read(fh)
        await k.release(fh)
    finally:
        undo()
    assert await k.cat(ino) == b"precious bytes"
    await k.settle()


# -- copy-on-write directories -----------------------------------------------------------------


@trio_test
async def test_failed_change_in_a_cloned_directory(k: Kernel, vol: Volume) -> None:
    a = await k.mkdir(ROOT, b"a")
    sub = await k.mkdir(a.st_ino, b"sub")
    await k.write_file(sub.st_ino, b"x", b"x")
    with vol.store.write() as txn:  # annofs cp /a /b: an O(1) copy sharing /a's nodes
        vol.namespace.copy(txn, [b"a"], [b"b"])
    b = await k.lookup(ROOT, b"b")
    with fuse_errno(errno.ENOTEMPTY):
        await k.rmdir(b.st_ino, b"sub")
    try:
        assert (await k.lookup(b.st_ino, b"sub")).st_ino != sub.st_ino
        assert [n for n, _ in await k.listdir(b.st_ino)] == [b"sub"]
    finally:
        await k.forget_all()


KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10


@trio_test
async def test_fallocate_modes_and_seek_data_hole(k: Kernel, vol: Volume) -> None:
    """The handlers pyfuse3 calls for FUSE_FALLOCATE/FUSE_LSEEK (3.5.0 as patched by
    scripts/pyfuse3-patched.sh): each mode against a byte model, holes as SEEK_HOLE sees
    them, before and after the commit (the same answers: only runs a commit keeps as
    holes count)."""
    data = random.Random(12).randbytes(600_000)
    ino = await k.write_file(ROOT, b"f", data)
    model = bytearray(data)
    fh = await k.open(ino)

    async def seek(off: int, whence: int) -> int:
        return await k.ops.lseek(fh, off, whence)

    assert await seek(0, os.SEEK_DATA) == 0
    assert await seek(0, os.SEEK_HOLE) == len(model)  # only the end
    await k.ops.fallocate(fh, PUNCH_HOLE | KEEP_SIZE, 100_000, 200_000)
    model[100_000:300_000] = bytes(200_000)
    await k.ops.fallocate(fh, ZERO_RANGE, 550_000, 150_000)  # past the end: grows
    model[550_000:] = bytes(50_000)
    model += bytes(100_000)
    await k.ops.fallocate(fh, 0, 0, 800_000)  # grows, as a hole
    model += bytes(800_000 - len(model))
    await k.ops.fallocate(fh, KEEP_SIZE, 0, 5 << 20)  # nothing changes
    await k.ops.fallocate(fh, PUNCH_HOLE | KEEP_SIZE, 790_000, 1 << 20)  # clipped
    assert (await k.getattr(ino)).st_size == len(model) == 800_000
    for _committed in (False, True):
        assert await k.read(fh) == model
        assert await seek(0, os.SEEK_HOLE) == 100_000
        assert await seek(150_000, os.SEEK_HOLE) == 150_000
        assert await seek(150_000, os.SEEK_DATA) == 300_000
        assert await seek(300_000, os.SEEK_HOLE) == 550_000
        assert await seek(299_999, os.SEEK_DATA) == 300_000
        assert await seek(320_000, os.SEEK_DATA) == 320_000
        with fuse_errno(errno.ENXIO):
            await seek(560_000, os.SEEK_DATA)  # holes to the end
        with fuse_errno(errno.ENXIO):
            await seek(800_000, os.SEEK_HOLE)
        await k.flush(fh)
    v = version(vol, int(stored(vol, b"f").target))
    # Data [0, 100000) and [300000, 550000); holes [100000, 300000), [550000, 800000).
    assert v.stored_size == 350_000
    assert (await k.getattr(ino)).st_blocks == (350_000 + 511) // 512
    assert version_content(vol, v.id) == model
    for mode in (0x04, 0x08, 0x20, 0x40, PUNCH_HOLE, PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE):
        with fuse_errno(errno.EOPNOTSUPP):
            await k.ops.fallocate(fh, mode, 0, 10)
    with fuse_errno(errno.EINVAL):
        await k.ops.fallocate(fh, 0, 0, 0)
    await k.release(fh)
    await k.settle()


@trio_test
async def test_a_directory_written_before_an_ancestor_is_shared(k: Kernel, vol: Volume) -> None:
    """A change caches its directory as exclusive (no walk from the root for the next
    create or close there): sharing an ancestor later must end that, or the next file
    written would appear in the copy too."""
    a = await k.mkdir(ROOT, b"a")
    sub = await k.mkdir(a.st_ino, b"sub")
    await k.write_file(sub.st_ino, b"one", b"1")  # /a/sub made exclusive, cached
    with vol.store.write() as txn:  # annofs cp /a /b: /a's node shared, /a/sub's not
        vol.namespace.copy(txn, [b"a"], [b"b"])
    await k.write_file(sub.st_ino, b"two", b"2")  # through the inode cached above
    try:
        b = await k.lookup(ROOT, b"b")
        b_sub = await k.lookup(b.st_ino, b"sub")
        assert [n for n, _ in await k.listdir(b_sub.st_ino)] == [b"one"]
        assert sorted(n for n, _ in await k.listdir(sub.st_ino)) == [b"one", b"two"]
    finally:
        await k.forget_all()
