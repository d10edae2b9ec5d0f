"""t3: the store-aware gate through the FUSE handlers in process (no kernel): open and
readlink pass the caller's uid and the file's owner, a registered store path's NAR is
hashed off the event loop (open's own transaction answers "ask again"), and
`user.annofs.status` says what that caller's open would get.

The store is the real one t2_nix_store_gate builds with Nix (its `world` fixture).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio
from t2_nix_store_gate import World, gate_for, world  # noqa: F401 (a fixture)
from t3_fs_trust import Ctx

from annofs.fs.enforce import OpenGuard
from annofs.fs.operations import Operations
from annofs.store.records import Version
from annofs.trust.verdict import Verdict
from annofs.volume import Volume

ROOT = pyfuse3.ROOT_INODE


AS_ROOT, AS_NOBODY = Ctx(), Ctx(uid=65534, gid=65534)


def nix_ops(vol: Volume, w: World) -> tuple[Operations, list[Verdict]]:
    seen: list[Verdict] = []

    def sink(path: str, v: Version, verdict: Verdict, pid: int, uid: int,
             why: object) -> None:
        seen.append(verdict)
    guard = OpenGuard(gate_for(vol, w), sink)
    guard.every_verdict = True  # allowances too: their reasons are what is checked
    return Operations(vol, guard), seen


async def walk(ops: Operations, path: str) -> int:
    ino = ROOT
    for name in path.strip("/").split("/"):
        ino = (await ops.lookup(ino, name.encode(), AS_ROOT)).st_ino
    return ino


async def opened(ops: Operations, ino: int, ctx: Ctx) -> bool:
    """Whether `ctx` may open the file (EACCES: False); the handle is closed again."""
    try:
        fi = await ops.open(ino, os.O_RDONLY, ctx)
    except pyfuse3.FUSEError as e:
        assert e.errno == errno.EACCES
        return False
    await ops.release(fi.fh)
    return True


def test_open_and_readlink_judge_as_nix_registered(vol: Volume, world: World) -> None:  # noqa: F811
    ops, seen = nix_ops(vol, world)

    async def main() -> None:
        signed = await walk(ops, world.signed + "/share/copied")
        # First open: the tree's NAR is not hashed yet; open's transaction asks again,
        # and the hash is made in a worker thread.
        assert await opened(ops, signed, AS_NOBODY)
        assert "signed by cache-a-1, cache-b-1 in Nix's database" in seen[-1].reason
        assert not await opened(ops, await walk(ops, world.half + "/share/copied"),
                                AS_NOBODY)
        assert await ops.readlink(await walk(ops, world.tree + "/l"), AS_NOBODY) == b"sub/a"

        store = await walk(ops, "/nix/store")
        top = (await ops.mkdir(store, b"3" * 32 + b"-in-flight", 0o755, AS_ROOT)).st_ino
        fi, entry = await ops.create(top, b"f", stat.S_IFREG | 0o644, os.O_WRONLY, AS_ROOT)
        await ops.write(fi.fh, 0, b"half written\n")
        await ops.release(fi.fh)
        link = (await ops.symlink(top, b"l", b"f", AS_ROOT)).st_ino
        assert await opened(ops, entry.st_ino, AS_ROOT)
        assert "in flight" in seen[-1].reason
        assert not await opened(ops, entry.st_ino, AS_NOBODY)
        assert await ops.readlink(link, AS_ROOT) == b"f"
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.readlink(link, AS_NOBODY)
        assert e.value.errno == errno.EACCES
        status = b"user.annofs.status"
        assert (await ops.getxattr(entry.st_ino, status, AS_NOBODY)).startswith(b"refused")
        assert (await ops.getxattr(entry.st_ino, status, AS_ROOT)).startswith(b"allowed")
        assert (await ops.getxattr(signed, status, AS_NOBODY)).startswith(b"allowed")

    trio.run(main)


def test_a_user_reads_what_they_wrote_in_flight(vol: Volume, world: World,  # noqa: F811
                                                tmp_path: Path) -> None:
    ops, _seen = nix_ops(vol, world)
    builder = Ctx(uid=999, gid=994)  # nixbld1 writing a build's output

    async def main() -> None:
        store = await walk(ops, "/nix/store")
        await ops.setattr(store, _mode(0o1777), _fields_mode(), None, AS_ROOT)
        out = (await ops.mkdir(store, b"4" * 32 + b"-out", 0o755, builder)).st_ino
        fi, entry = await ops.create(out, b"f", stat.S_IFREG | 0o644, os.O_WRONLY, builder)
        await ops.write(fi.fh, 0, b"output\n")
        await ops.release(fi.fh)
        assert await opened(ops, entry.st_ino, builder)
        assert not await opened(ops, entry.st_ino, AS_NOBODY)

    trio.run(main)


def _mode(mode: int) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_mode = stat.S_IFDIR | mode
    return a


def _fields_mode() -> object:
    from t3_fs_api import Fields
    return Fields(update_mode=True)


def test_writers_in_flight_share_a_lock_file_read_write(
        vol: Volume, world: World) -> None:  # noqa: F811
    """Every Nix process working on a path opens its `.lock` read-write at once: in
    flight, a writer's read-write open is allowed whatever the bytes, so it need not be
    the only writer. Elsewhere a judged read-write handle still is (EBUSY)."""
    ops, _seen = nix_ops(vol, world)

    async def main() -> None:
        store = await walk(ops, "/nix/store")
        first, entry = await ops.create(store, b"5" * 32 + b"-x.lock",
                                        stat.S_IFREG | 0o600, os.O_RDWR, AS_ROOT)
        others = [await ops.open(entry.st_ino, os.O_RDWR, AS_ROOT) for _ in range(3)]
        assert not await opened(ops, entry.st_ino, AS_NOBODY)
        for fi in (first, *others):
            await ops.release(fi.fh)
        signed = await walk(ops, world.signed + "/share/copied")
        rw = await ops.open(signed, os.O_RDWR, AS_ROOT)  # judged: allowed, signed
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(signed, os.O_RDWR, AS_ROOT)
        assert e.value.errno == errno.EBUSY
        await ops.release(rw.fh)

    trio.run(main)
