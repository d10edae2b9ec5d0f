"""t3: the policy at open(), with the FUSE handlers called in process (no kernel).

What the mount tests (t4_fuse_trust) cannot see from outside: a refused open leaves no
open state behind, an allowed one judges and serves the very version its open state
starts from, and both ways of judging (digest known: in open's own transaction;
digest deferred: hashed in a worker thread first) refuse and allow alike.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import threading
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from t3_fs_api import Fields

from annofs.daemon.events import EventLog, read_events
from annofs.daemon.policy_holder import PolicyHolder
from annofs.fs import operations
from annofs.fs.enforce import OpenGuard
from annofs.fs.operations import Operations
from annofs.store.records import Version
from annofs.trust.gate import TrustGate
from annofs.trust.keys import generate_key
from annofs.trust.policy import parse_policy
from annofs.trust.signing import collect_files, sign_files
from annofs.trust.verdict import Verdict
from annofs.volume import Volume

ALICE = generate_key("alice-1")
ROOT = pyfuse3.ROOT_INODE


@dataclasses.dataclass(frozen=True)
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 4321
    umask: int = 0o022


CTX = Ctx()


def policy_ops(vol: Volume) -> tuple[Operations, list[tuple[str, Version, Verdict]]]:
    pol = parse_policy(f'trusted-public-keys = ["{ALICE.public_key().to_text()}"]\n'
                       '[[rules]]\npath = "/src/**"\nsigners = 1\n', Path("p.toml"))
    seen: list[tuple[str, Version, Verdict]] = []
    guard = OpenGuard(TrustGate(vol, pol), lambda path, v, verdict, pid, uid, why: seen.append(
        (path, v, verdict)))
    return Operations(vol, guard), seen


async def put(ops: Operations, parent: int, name: bytes, data: bytes) -> int:
    """Create a file through the handlers (its digest is deferred, as for any write)."""
    fi, entry = await ops.create(parent, name, stat.S_IFREG | 0o644, os.O_WRONLY, CTX)
    await ops.write(fi.fh, 0, data)
    await ops.release(fi.fh)
    return entry.st_ino


async def refused(ops: Operations, ino: int, flags: int = os.O_RDONLY) -> bool:
    try:
        fi = await ops.open(ino, flags, CTX)
    except pyfuse3.FUSEError as e:
        assert e.errno == errno.EACCES
        return True
    await ops.release(fi.fh)
    return False


def test_open_judges_what_it_serves_and_a_refusal_leaves_nothing(vol: Volume) -> None:
    ops, seen = policy_ops(vol)

    async def main() -> None:
        src = (await ops.mkdir(ROOT, b"src", 0o755, CTX)).st_ino
        ino = await put(ops, src, b"a.c", b"int a;\n")
        # Deferred digest: hashed in a thread, recorded, then refused.
        assert await refused(ops, ino)
        assert ino not in ops.open_files
        assert seen[-1][0] == "/src/a.c" and seen[-1][1].digest is not None
        # Digest known now: judged in open's own transaction, refused the same way.
        assert await refused(ops, ino)
        assert ino not in ops.open_files
        sign_files(vol, collect_files(vol, [[b"src", b"a.c"]]), ALICE, "reviewed")
        recorded = len(seen)
        fi = await ops.open(ino, os.O_RDONLY, CTX)  # the new statement counts at once
        assert len(seen) == recorded  # an allowance is not recorded
        pinned = ops.handles[fi.fh].pinned
        assert pinned is not None and ops.open_files[ino].base.id == pinned.id
        assert await ops.read(fi.fh, 0, 100) == b"int a;\n"
        await ops.release(fi.fh)
        assert ino not in ops.open_files
        # A writer holds the file open: a refused reader must not take its state away.
        w = await ops.open(ino, os.O_WRONLY, CTX)
        await ops.write(w.fh, 0, b"int b;\n")
        state = ops.open_files[ino]
        assert await refused(ops, ino)  # its bytes were committed and are unsigned
        assert ops.open_files[ino] is state
        await ops.write(w.fh, 7, b"int c;\n")
        await ops.release(w.fh)
        assert ino not in ops.open_files
        assert await refused(ops, ino, os.O_RDWR)
        with vol.store.read() as txn:
            v = vol.versions.get(txn, int(vol.namespace.resolve(txn, [b"src", b"a.c"]).target))
            assert vol.versions.read(txn, v, 0, 100) == b"int b;\nint c;\n"

    trio.run(main)


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR])
def test_open_outside_the_rules_is_not_refused(vol: Volume, flags: int) -> None:
    ops, seen = policy_ops(vol)

    async def main() -> None:
        ino = await put(ops, ROOT, b"notes", b"free\n")
        assert not await refused(ops, ino, flags)
        assert not seen  # allowed, so nothing recorded

    trio.run(main)


def test_refusals_are_explained_in_the_events_log_up_to_the_rate_limit(
        vol: Volume, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'trusted-public-keys = ["{ALICE.public_key().to_text()}"]\n'
                      '[[rules]]\npath = "/src/**"\nsigners = 1\n')
    holder = PolicyHolder(vol, policy, tmp_path / "mnt", EventLog(vol.store.path))
    ops = Operations(vol, holder.guard)
    burst = holder.explained.burst

    async def main() -> None:
        src = (await ops.mkdir(ROOT, b"src", 0o755, CTX)).st_ino
        ino = await put(ops, src, b"a.c", b"int a;\n")
        sign_files(vol, collect_files(vol, [[b"src", b"a.c"]]), ALICE, "reviewed")
        fi = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)
        await ops.write(fi.fh, 0, b"int b;\n")
        await ops.release(fi.fh)
        for _ in range(burst + 2):
            assert await refused(ops, ino)

    with caplog.at_level(logging.INFO, logger="annofs"):
        trio.run(main)
    events = read_events(vol.store.path)
    assert [e.verdict for e in events] == ["refused"] * (burst + 2)
    explained = [e for e in events if e.explanation]
    assert len(explained) == burst  # the rest only say that they were refused
    assert "-int a;\n+int b;\n" in explained[0].explanation
    assert explained[0].details is not None
    assert explained[0].details["original"]["found_by"] == "edit graph"
    assert all(e.reason == events[0].reason and e.details is None for e in events[burst:])
    summaries = [r.getMessage() for r in caplog.records if "found by edit graph" in r.getMessage()]
    assert len(summaries) == burst and "text diff -1 +1 lines" in summaries[0]


def test_a_file_too_large_to_hash_is_not_served_under_a_rule(vol: Volume) -> None:
    """A sparse file with more holes than annofs hashes (16 GiB) has no digest: nothing
    can have signed it, and it is not served where a rule must judge it (EFBIG, the
    error the digest gives); it is not silently allowed."""
    ops, seen = policy_ops(vol)

    async def main() -> None:
        src = (await ops.mkdir(ROOT, b"src", 0o755, CTX)).st_ino
        ino = await put(ops, src, b"huge", b"data")
        await ops._truncate(ops.inodes.get(ino), 1 << 50)  # truncate(2) by path
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(ino, os.O_RDONLY, CTX)
        assert e.value.errno == errno.EFBIG
        assert ino not in ops.open_files
        assert not any(v.size == 1 << 50 and verdict.allowed for _, v, verdict in seen)

    trio.run(main)


def test_writer_slots_are_taken_before_open_waits_for_anything(vol: Volume) -> None:
    """A read-write open of content written through the mount hashes it first (in a
    thread). Opens arriving meanwhile see its slot: a write-only open, an O_RDONLY|O_TRUNC
    open and a truncate by path are EBUSY; once it is refused, its slot is free again."""
    ops, _ = policy_ops(vol)

    async def main() -> None:
        src = (await ops.mkdir(ROOT, b"src", 0o755, CTX)).st_ino
        ino = await put(ops, src, b"a.c", b"int a;\n")  # unsigned: the rw open is refused
        results: list[int] = []

        async def open_rw() -> None:
            try:
                await ops.open(ino, os.O_RDWR, CTX)
            except pyfuse3.FUSEError as e:
                results.append(e.errno)

        # Hold the hashing thread until the other opens have been tried: the window.
        gate = ops.guard.gate
        assert gate is not None
        hashed, go = gate.hashed, threading.Event()

        def slow_hash(v: Version) -> Version:
            go.wait(10)
            return hashed(v)

        gate.hashed = slow_hash  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_rw)
            await trio.testing.wait_all_tasks_blocked()  # it is hashing in a thread
            assert ops.guard.state(ops._node(ino)).verified_rw == 1
            for flags in (os.O_WRONLY, os.O_RDONLY | os.O_TRUNC, os.O_RDWR):
                with pytest.raises(pyfuse3.FUSEError) as e:
                    await ops.open(ino, flags, CTX)
                assert e.value.errno == errno.EBUSY
            attr = pyfuse3.EntryAttributes()
            attr.st_size = 0
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.setattr(ino, attr, Fields(update_size=True), None,  # type: ignore[arg-type]
                                  CTX)
            assert e.value.errno == errno.EBUSY
            go.set()
        assert results == [errno.EACCES]
        st = ops.guard.state(ops._node(ino))
        assert (st.writers, st.verified_rw, st.readers, st.pinned) == (0, 0, 0, 0)
        fi = await ops.open(ino, os.O_WRONLY, CTX)  # free again
        await ops.release(fi.fh)

    trio.run(main)


def test_a_link_checks_the_rule_boundary_after_waiting(vol: Volume,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """link() commits the file's unflushed bytes first (an await). A rename meanwhile
    that moves the file out from under /src must not leave it hard-linked across rules."""
    ops, _ = policy_ops(vol)

    async def main() -> None:
        src = (await ops.mkdir(ROOT, b"src", 0o755, CTX)).st_ino
        ino = await put(ops, src, b"a.c", b"int a;\n")
        fi = await ops.open(ino, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, b"int b;\n")  # unflushed: link commits it first
        go = trio.Event()
        real_fold = operations.fold

        async def held_fold(*args, **kwargs):  # type: ignore[no-untyped-def]
            await go.wait()  # the window, held open until the rename is done
            return await real_fold(*args, **kwargs)

        monkeypatch.setattr(operations, "fold", held_fold)
        result: list[object] = []

        async def link() -> None:
            try:
                await ops.link(ino, src, b"b.c", CTX)
                result.append("linked")
            except pyfuse3.FUSEError as e:
                result.append(e.errno)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(link)
            await trio.testing.wait_all_tasks_blocked()
            await ops.rename(src, b"a.c", ROOT, b"a.c", 0, CTX)  # to the default rule
            go.set()
        assert result == [errno.EXDEV]
        await ops.release(fi.fh)

    trio.run(main)
