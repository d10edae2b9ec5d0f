"""t3: `user.annofs.why` through the FUSE handlers, as different callers (issue 15.4):
the explanation shows what the asking uid could open and nothing more, and it is
bounded per uid (a token bucket; over it, a one-line answer, no work)."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import trio
from t2_explain import PATCHED, SOURCE
from t3_fs_trust import ALICE, CTX, ROOT, Ctx, policy_ops, put

from annofs.explain.throttle import WHY_BURST, PerCaller, Recent, limited_text
from annofs.fs.operations import Operations
from annofs.trust.signing import collect_files, sign_files
from annofs.volume import Volume

WHY = b"user.annofs.why"
NOBODY = Ctx(uid=65534, gid=65534, pid=0)
SECRET = "int f1500(int x) { return x * 1500 + 2; }"


async def setup(ops: Operations, vol: Volume, private: bool) -> int:
    """/src/secret/main.c (signed; in a 0700 directory if `private`), and a patched copy
    at /src/drop/main.c; the copy's inode."""
    src = (await ops.mkdir(ROOT, b"src", 0o755, CTX)).st_ino
    secret = (await ops.mkdir(src, b"secret", 0o700 if private else 0o755, CTX)).st_ino
    await put(ops, secret, b"main.c", SOURCE)
    sign_files(vol, collect_files(vol, [[b"src", b"secret"]]), ALICE, "reviewed")
    drop = (await ops.mkdir(src, b"drop", 0o777, CTX)).st_ino
    fi, entry = await ops.create(drop, b"main.c", stat.S_IFREG | 0o644, os.O_WRONLY, NOBODY)
    await ops.write(fi.fh, 0, PATCHED)
    await ops.release(fi.fh)
    return entry.st_ino


def test_why_shows_the_original_only_to_who_may_read_it(vol: Volume) -> None:
    ops, _ = policy_ops(vol)

    async def main() -> None:
        ino = await setup(ops, vol, private=True)
        mine = (await ops.getxattr(ino, WHY, NOBODY)).decode()
        assert "signed by alice-1 (trusted)" in mine and "withheld" in mine
        assert SECRET not in mine and "secret/main.c" not in mine
        owner = (await ops.getxattr(ino, WHY, CTX)).decode()  # root: the owner here
        assert SECRET in owner and "as secret/main.c" in owner

    trio.run(main)


def test_why_shows_an_original_anybody_may_read(vol: Volume) -> None:
    ops, _ = policy_ops(vol)

    async def main() -> None:
        ino = await setup(ops, vol, private=False)
        mine = (await ops.getxattr(ino, WHY, NOBODY)).decode()
        assert SECRET in mine and "as secret/main.c" in mine

    trio.run(main)


def test_why_is_bounded_per_uid(vol: Volume) -> None:
    ops, _ = policy_ops(vol)

    async def main() -> None:
        ino = await setup(ops, vol, private=False)
        # Asked again at once (getxattr's usual size probe, then the value): one answer.
        again = [await ops.getxattr(ino, WHY, NOBODY) for _ in range(WHY_BURST + 5)]
        assert len(set(again)) == 1 and SECRET.encode() in again[0]
        assert ops.stats["why_explained"] == 1 and ops.stats["why_limited"] == 0
        ops.why_recent = Recent(seconds=-1)  # as if each came later, or for another file
        answers = [await ops.getxattr(ino, WHY, NOBODY) for _ in range(WHY_BURST + 4)]
        full = [a for a in answers if SECRET.encode() in a]
        limited = [a for a in answers if a.startswith(b"explanation rate-limited")]
        assert len(full) == WHY_BURST - 1 and len(limited) == 5  # one token went above
        assert limited[0] == b"explanation rate-limited, try again in 6 s\n"
        assert ops.stats["why_explained"] == WHY_BURST and ops.stats["why_limited"] == 5
        other = Ctx(uid=1000, gid=1000, pid=0)  # another user is not slowed down
        assert SECRET.encode() in await ops.getxattr(ino, WHY, other)
        # status is cheap and not limited
        assert (await ops.getxattr(ino, b"user.annofs.status", NOBODY)).startswith(b"refused")

    trio.run(main)


def test_the_bucket_refills_and_forgets_idle_callers() -> None:
    lim = PerCaller(burst=2, per=10.0)
    assert lim.wait(1, 0.0) == 0 and lim.wait(1, 0.0) == 0
    assert lim.wait(1, 0.0) == 5.0
    assert lim.wait(2, 0.0) == 0  # per uid
    assert lim.wait(1, 5.0) == 0 and lim.wait(1, 5.0) == 5.0
    assert limited_text(0.2) == b"explanation rate-limited, try again in 1 s\n"
    for uid in range(5000):  # bounded memory whatever the uids
        lim.wait(100 + uid, 100.0 + uid)
    assert len(lim._buckets) <= 1024


def test_no_policy_no_limit(vol: Volume) -> None:
    ops = Operations(vol)

    async def main() -> None:
        ino = await put(ops, ROOT, b"f", b"x")
        for _ in range(WHY_BURST + 2):
            assert await ops.getxattr(ino, WHY, NOBODY) == b"off: no policy loaded"
        assert ops.stats["why_limited"] == 0

    trio.run(main)


def test_one_user_s_explanation_in_progress_does_not_hold_up_another_s(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explanations are CPU work in worker threads. They were one at a time for the whole
    mount: while uid 65534's costly explanation ran, root's waited (attacker review
    finding 8). Now each uid's run in its own threads."""
    import annofs.explain.visibility as visibility

    real = visibility.why_xattr
    nobody_inside, let_go = threading.Event(), threading.Event()

    def slow_for_nobody(gate: object, path: object, v: object, verdict: object,
                        caller: visibility.Caller) -> bytes:
        if caller.uid == NOBODY.uid:
            nobody_inside.set()
            let_go.wait(30)
        return real(gate, path, v, verdict, caller)  # type: ignore[arg-type]

    monkeypatch.setattr(visibility, "why_xattr", slow_for_nobody)
    ops, _ = policy_ops(vol)

    async def main() -> None:
        ino = await setup(ops, vol, private=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.getxattr, ino, WHY, NOBODY)
            await trio.to_thread.run_sync(nobody_inside.wait, 10)
            with trio.fail_after(10):
                assert SECRET.encode() in await ops.getxattr(ino, WHY, CTX)
            let_go.set()

    trio.run(main)
