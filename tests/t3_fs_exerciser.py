"""The exerciser's random operations (benchmarks/exerciser.py) through `Operations` in
process, with "remounts" (a new Operations on the same store). There is no kernel, so no
oracle: what must hold is that every call answers with a value or a FUSEError, nothing is
logged (an unexpected exception becomes a logged EIO, which fails the test), a whole
read returns as many bytes as getattr says, no handle or inode is left once everything
is closed and forgotten, and the store passes fsck's checker.

Paths are walked with lookups as the kernel would, but symlinks are not followed (a
lookup under one is ENOTDIR here). ANNOFS_FULL=1 runs 100k operations.
"""

from __future__ import annotations

import os
from typing import Any

import pyfuse3
from t3_fs_api import CTX, Kernel, k, ops, trio_test

from annofs.fs.operations import Operations
from annofs.maintenance.fsck import check_store
from annofs.volume import Volume
from benchmarks.exerciser import BIG_FILE, FAR, SLOTS, Generator, Op, data_of

__all__ = ["k", "ops"]  # fixtures, used by name

FULL = os.environ.get("ANNOFS_FULL") == "1"
OPS = 100_000 if FULL else 8_000
REMOUNT_EVERY = 2_000
_FLAGS = {"r": os.O_RDONLY, "rw": os.O_RDWR, "rwc": os.O_RDWR, "append": os.O_WRONLY,
          "trunc": os.O_RDWR | os.O_TRUNC}


class InProcess:
    """Applies exerciser operations to Operations through a Kernel stand-in."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.slots: list[tuple[int, int, str] | None] = [None] * SLOTS  # (ino, fh, mode)
        self.errors = 0
        self.reads = 0

    async def check_read(self, ino: int, fh: int, *, exact: bool = True) -> None:
        """A whole read gives getattr's size; a big (sparse) file is read at its start,
        at the generator's far offsets and at its end, each answer as long as it must be."""
        size = (await self.k.getattr(ino)).st_size
        if size <= BIG_FILE:
            got = await self.k.read(fh)
            assert not exact or len(got) == size
            return
        for off in (0, *FAR, size - 1000):
            got = await self.k.read(fh, off, 128 * 1024)
            assert not exact or len(got) == max(0, min(128 * 1024, size - off))

    async def walk(self, path: str) -> tuple[int, bytes]:
        """(parent inode, last name) of a path, looking up every directory on the way."""
        *dirs, name = path.split("/")
        parent = pyfuse3.ROOT_INODE
        for d in dirs:
            parent = (await self.k.lookup(parent, d.encode())).st_ino
        return parent, name.encode()

    async def ino(self, path: str) -> int:
        parent, name = await self.walk(path)
        return (await self.k.lookup(parent, name)).st_ino

    async def write_file(self, path: str, data: bytes, *, off: int | None = None,
                         create: bool = False, excl: bool = False) -> None:
        parent, name = await self.walk(path)
        if excl:
            fh, _ = await self.k.create(parent, name)
        else:
            try:
                ino = (await self.k.lookup(parent, name)).st_ino
            except pyfuse3.FUSEError:
                if not create:
                    raise
                fh, _ = await self.k.create(parent, name)
            else:
                fh = await self.k.open(ino, os.O_WRONLY | (os.O_TRUNC if create else 0))
                if off is None and not create:  # append
                    off = (await self.k.getattr(ino)).st_size
        try:
            if data:
                await self.k.write(fh, off or 0, data)
        finally:
            await self.k.flush(fh)
            await self.k.release(fh)

    async def close_slot(self, i: int) -> None:
        slot = self.slots[i]
        if slot is not None:
            self.slots[i] = None
            await self.k.flush(slot[1])
            await self.k.release(slot[1])

    async def close_all(self) -> None:
        for i in range(SLOTS):
            await self.close_slot(i)

    async def apply(self, op: Op) -> None:
        try:
            await self._run(op)
        except pyfuse3.FUSEError:
            self.errors += 1

    async def _run(self, op: Op) -> Any:
        kind, a, k = op.kind, op.args, self.k
        if kind in ("create", "create_excl"):
            await self.write_file(a[0], data_of(a[1]), create=True, excl=kind == "create_excl")
        elif kind == "append":
            await self.write_file(a[0], data_of(a[1]))
        elif kind == "write":
            await self.write_file(a[0], data_of(a[2]), off=a[1])
        elif kind == "truncate":
            await k.setattr(await self.ino(a[0]), size=a[1])
        elif kind in ("rename", "exchange", "noreplace"):
            flags = {"rename": 0, "exchange": pyfuse3.RENAME_EXCHANGE,
                     "noreplace": pyfuse3.RENAME_NOREPLACE}[kind]
            (p1, n1), (p2, n2) = await self.walk(a[0]), await self.walk(a[1])
            await k.rename(p1, n1, p2, n2, flags)
        elif kind == "link":
            ino = await self.ino(a[0])
            await k.link(ino, *await self.walk(a[1]))
        elif kind == "symlink":
            await k.symlink(*await self.walk(a[1]), a[0].encode())
        elif kind == "unlink":
            await k.unlink(*await self.walk(a[0]))
        elif kind == "mkdir":
            await k.mkdir(*await self.walk(a[0]))
        elif kind == "rmdir":
            await k.rmdir(*await self.walk(a[0]))
        elif kind == "chmod":
            await k.setattr(await self.ino(a[0]), mode=a[1])
        elif kind == "chown":
            ids = {"uid": a[1], "gid": a[2]}
            await k.setattr(await self.ino(a[0]), **{n: v for n, v in ids.items() if v >= 0})
        elif kind == "utime":
            await k.setattr(await self.ino(a[0]), atime_ns=a[1], mtime_ns=a[1])
        elif kind == "setxattr":
            await k.ops.setxattr(await self.ino(a[0]), a[1].encode(), a[2], CTX)
        elif kind == "removexattr":
            await k.ops.removexattr(await self.ino(a[0]), a[1].encode(), CTX)
        elif kind == "read":
            ino = await self.ino(a[0])
            fh = await k.open(ino, os.O_RDONLY)
            try:
                await self.check_read(ino, fh)
                self.reads += 1
            finally:
                await k.release(fh)
        elif kind == "readdir":
            await k.listdir(await self.ino(a[0]))
        elif kind == "stat":
            await k.getattr(await self.ino(a[0]))
        elif kind == "readlink":
            await k.ops.readlink(await self.ino(a[0]), CTX)
        elif kind == "fsync":
            fh = await k.open(await self.ino(a[0]), os.O_RDONLY)
            try:
                await k.ops.fsync(fh, False)
            finally:
                await k.release(fh)
        elif kind == "open":
            slot, path, mode = a
            parent, name = await self.walk(path)
            try:
                ino = (await k.lookup(parent, name)).st_ino
                fh = await k.open(ino, _FLAGS[mode])
            except pyfuse3.FUSEError:
                if mode != "rwc":
                    raise
                fh, e = await k.create(parent, name)
                ino = e.st_ino
            await self.close_slot(slot)
            self.slots[slot] = (ino, fh, mode)
        elif self.slots[a[0]] is None:
            return  # an operation on an empty slot: skipped, as the exerciser does
        elif kind == "close":
            await self.close_slot(a[0])
        else:
            ino, fh, mode = self.slots[a[0]]  # type: ignore[misc]
            if kind == "fd_write" and mode != "r":
                await k.write(fh, a[1], data_of(a[2]))
            elif kind == "fd_fallocate" and mode != "r":
                await k.ops.fallocate(fh, a[1], a[2], a[3])
            elif kind == "fd_read" and mode != "append":
                await self.check_read(ino, fh, exact=False)
            elif kind == "fd_stat":
                await k.getattr(ino)
            elif kind == "fd_truncate" and mode != "r":
                await k.setattr(ino, fh, size=a[1])
            elif kind == "fd_fsync":
                await k.ops.fsync(fh, False)


@trio_test
async def test_random_operations_in_process(vol: Volume, k: Kernel) -> None:
    ops_list = Generator(11).ops(OPS)
    run = InProcess(k)
    for i, op in enumerate(ops_list):
        await run.apply(op)
        if (i + 1) % REMOUNT_EVERY == 0:
            await run.close_all()
            await run.k.settle()
            run.k = Kernel(Operations(vol))  # a remount: a new inode table
    await run.close_all()
    await run.k.settle()
    problems = check_store(vol).problems
    assert not problems, "\n".join(problems)
    assert 0 < run.errors < len(ops_list) and run.reads > len(ops_list) // 100
    print(f"in process: {len(ops_list)} operations, {run.errors} FUSE errors, "
          f"{run.reads} reads")

