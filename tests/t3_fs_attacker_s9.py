"""Session 9's disk-read threads attacked in process (Operations called as the kernel
calls them, no mount): a READ whose pack bytes are not in the page cache now waits
(for one of DISK_READ_THREADS, then for the disk) between choosing the version it
serves and reading it. Anything that lands in that wait must not turn the read into
an error or into bytes of another version.

The four disk-read threads are held here by taking the limiter's tokens: on a real
mount, uid 65534's cold reads of four big files of its own hold them as long as the
disk takes (see t4_fuse_attacker_s9)."""

from __future__ import annotations

import os
import random

import trio
from store_damage import evict_packs
from t3_fs_api import (  # noqa: F401  (fixtures)
    ROOT,
    Kernel,
    consistent_store,
    k,
    ops,
    trio_test,
)

from annofs.fs.operations import DISK_READ_THREADS, Operations
from annofs.maintenance.gc import collect
from annofs.volume import Volume


@trio_test
async def test_a_gc_while_a_read_waits_for_a_disk_thread_does_not_free_what_it_reads(
        k: Kernel, ops: Operations, vol: Volume) -> None:  # noqa: F811
    """A read-write handle's READ serves the file's current version (of.base). It picks
    it, finds the bytes not cached, and waits for a disk thread; meanwhile another handle
    writes the file and closes (a new version) and root runs `annofs gc --prune-history`,
    which keeps only the versions handles serve now (held_versions): the READ's version
    is no longer one of them. The READ must still answer (the bytes it picked, or the new
    ones), not EIO on fragments freed under it."""
    old = random.Random(1).randbytes(3 << 20)
    new = random.Random(2).randbytes(3 << 20)
    ino = await k.write_file(ROOT, b"f", old)
    reader = await k.open(ino, os.O_RDWR)  # not pinned: serves of.base
    evict_packs(vol)
    result: list[object] = []

    async def read() -> None:
        try:
            result.append(await k.read(reader, 1 << 20, 1 << 20))
        except Exception as e:  # the failure is the finding
            result.append(e)

    held = [object() for _ in range(DISK_READ_THREADS)]
    for t in held:  # four cold reads of another user's big files in progress
        await ops._disk_readers.acquire_on_behalf_of(t)
    async with trio.open_nursery() as n:
        n.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert not result, "the read should be waiting for a disk thread"
        writer = await k.open(ino, os.O_WRONLY)
        await k.write(writer, 0, new)
        await k.flush(writer)
        await k.release(writer)
        async with ops.gc_gate.exclusive():  # as the control command's gc does
            await trio.to_thread.run_sync(lambda: collect(
                vol, prune_history=True, extra_roots=ops.held_versions(),
                keep_fragments=ops.unstored_fragments()))
        for t in held:
            ops._disk_readers.release_on_behalf_of(t)
    await k.release(reader)
    await k.settle()
    got = result[0]
    assert not isinstance(got, BaseException), f"the READ failed: {got!r}"
    assert got in (old[1 << 20:2 << 20], new[1 << 20:2 << 20])
