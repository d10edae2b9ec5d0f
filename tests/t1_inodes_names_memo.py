"""The names memo of a many-named inode (fs/inodes.py `NameMemo`): one name per key,
valid only while the inode's names, every directory on the way to them and the token
stay. Each test checks the memo against a walk of every name (`judged_paths`)."""

from __future__ import annotations

import stat
import time
from collections.abc import Sequence

from annofs.fs.inodes import MAX_MEMOS, ROOT, Inode, InodeTable, NameMemo
from annofs.store.records import Attrs

DIR = Attrs(stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, 0, 1)
FILE = Attrs(stat.S_IFREG | 0o644, 0, 0, 0, 0, 0, 0, 1, link=7)


def by_top(path: Sequence[bytes]) -> bytes:
    """A stand-in for a policy's rule: the top directory."""
    return bytes(path[0])


def table(names: int) -> tuple[InodeTable, dict[str, Inode], Inode]:
    """/src/a/x and /scratch/b/l0..l{names-1}: one file (link 7); /scratch/c empty."""
    t = InodeTable()
    d: dict[str, Inode] = {}
    d["src"] = t.ensure(ROOT, b"src", DIR, 0)
    d["scratch"] = t.ensure(ROOT, b"scratch", DIR, 0)
    d["a"] = t.ensure(d["src"].ino, b"a", DIR, 0)
    d["b"] = t.ensure(d["scratch"].ino, b"b", DIR, 0)
    d["c"] = t.ensure(d["scratch"].ino, b"c", DIR, 0)
    f = t.ensure(d["b"].ino, b"l0", FILE, 7)
    for i in range(1, names):
        t.ensure(d["b"].ino, f"l{i}".encode(), FILE, 7)
    t.ensure(d["a"].ino, b"x", FILE, 7)
    return t, d, f


def built(t: InodeTable, f: Inode, token: object = "p1") -> NameMemo:
    memo = t.memo_for(f, token, by_top)
    while not t.scan_step(f, memo, 16):
        pass
    assert t.memo_valid(f, memo, token)
    return memo


def keys(paths: list[list[bytes]]) -> set[bytes]:
    return {by_top(p) for p in paths}


def test_the_memo_holds_one_name_per_key_and_every_key() -> None:
    t, _d, f = table(100)
    memo = built(t, f)
    paths = t.memo_paths(f, memo, uid=0)
    assert len(paths) <= 3  # the inode's own name, then one per key
    assert keys(paths) == keys(t.judged_paths(f, 0)) == {b"src", b"scratch"}


def test_a_directory_moved_above_a_name_makes_it_stale_another_does_not() -> None:
    t, d, f = table(100)
    memo = built(t, f)
    t.move(d["c"], d["scratch"].ino, b"c", ROOT, b"c")  # above none of its names
    assert t.memo_valid(f, memo, "p1")
    t.move(d["a"], d["src"].ino, b"a", d["scratch"].ino, b"a")  # above x
    assert not t.memo_valid(f, memo, "p1")
    paths = t.memo_paths(f, built(t, f), uid=0)
    assert keys(paths) == keys(t.judged_paths(f, 0)) == {b"scratch"}


def test_a_move_while_it_is_built_makes_it_start_over() -> None:
    t, d, f = table(100)
    memo = t.memo_for(f, "p1", by_top)
    assert not t.scan_step(f, memo, 90)  # most names walked: /scratch/b/...
    t.move(d["b"], d["scratch"].ino, b"b", d["src"].ino, b"b")  # now /src/b/...
    assert t.scan_step(f, memo, 90) and memo.stale and not t.memo_valid(f, memo, "p1")
    assert keys(t.memo_paths(f, built(t, f), 0)) == keys(t.judged_paths(f, 0)) == {b"src"}


def test_a_name_added_joins_the_memo_a_name_lost_makes_it_stale() -> None:
    t, d, f = table(100)
    t.move(d["a"], d["src"].ino, b"a", d["scratch"].ino, b"a")
    memo = built(t, f)
    assert keys(t.memo_paths(f, memo, 0)) == {b"scratch"}
    srcdir = t.ensure(d["src"].ino, b"k", DIR, 0)
    t.ensure(srcdir.ino, b"y", FILE, 7)  # a name looked up: added, walked alone
    assert t.memo_valid(f, memo, "p1")
    assert keys(t.memo_paths(f, memo, 0)) == keys(t.judged_paths(f, 0)) == {b"scratch", b"src"}
    t.unbind(srcdir.ino, b"y")
    assert not t.memo_valid(f, memo, "p1")
    assert keys(t.memo_paths(f, built(t, f), 0)) == {b"scratch"}


def test_a_name_looked_up_while_it_is_built_joins_it_a_name_lost_makes_it_stale() -> None:
    # Anyone who may read a directory looks names up: that must not make a build stale.
    t, d, f = table(100)
    memo = t.memo_for(f, "p1", by_top)
    assert not t.scan_step(f, memo, 60)
    srcdir = t.ensure(d["src"].ino, b"k", DIR, 0)
    t.ensure(srcdir.ino, b"y", FILE, 7)
    t.ensure(d["c"].ino, b"z", FILE, 7)
    while not t.scan_step(f, memo, 60):
        pass
    assert t.memo_valid(f, memo, "p1")
    assert keys(t.memo_paths(f, memo, 0)) == keys(t.judged_paths(f, 0)) == {b"scratch", b"src"}
    again = t.memo_for(f, "p2", by_top)  # (another policy: built again)
    assert not t.scan_step(f, again, 60)
    t.unbind(d["a"].ino, b"x")
    assert t.scan_step(f, again, 60) and again.stale


def test_another_token_another_memo() -> None:
    t, _d, f = table(100)
    memo = built(t, f)
    assert not t.memo_valid(f, memo, "p2")
    assert t.memo_for(f, "p2", by_top) is not memo


def test_names_left_by_moves_are_kept_per_mover() -> None:
    t, d, f = table(100)
    t.any_left = True
    d["b"].left.append(((b"src", b"old"), 65534))  # b was moved out of /src by 65534
    paths = t.memo_paths(f, built(t, f), uid=0)
    assert any(p[:2] == [b"src", b"old"] for p in paths)
    mover = t.memo_paths(f, built(t, f), uid=65534)
    assert not any(p[:2] == [b"src", b"old"] for p in mover)
    assert keys(mover) == keys(t.judged_paths(f, 65534))


def test_memos_being_built_are_not_pushed_out_by_others() -> None:
    # A user with many files of many names must not make another's build start over.
    t, _d, f = table(100)
    mine = t.memo_for(f, "p1", by_top)
    assert not t.scan_step(f, mine, 10)
    others = []
    for i in range(MAX_MEMOS + 10):
        g = t.ensure(ROOT, f"g{i}".encode(), FILE, 100 + i)
        t.ensure(ROOT, f"h{i}".encode(), FILE, 100 + i)
        others.append(built(t, g))
    assert sum(m.stale for m in others) == 10  # complete ones: the oldest go
    while not t.scan_step(f, mine, 10):
        pass
    assert t.memo_valid(f, mine, "p1")
    assert t.scan_step(f, mine, 10)  # done already (as when another open built it)


def test_a_step_costs_about_its_chunk_however_deep_the_names() -> None:
    # The build runs on the event loop, a step at a time: a step must stay short. A
    # path kept per directory on the way made one name 5,000 levels deep cost the
    # depth squared in one step (0.43 s; a walk of every name took 1 ms).
    t = InodeTable()
    top = t.ensure(ROOT, b"top", DIR, 0)
    f = t.ensure(top.ino, b"f0", FILE, 7)
    for i in range(1, 70):
        t.ensure(top.ino, f"f{i}".encode(), FILE, 7)
    cur = top
    for _ in range(5000):
        cur = t.ensure(cur.ino, b"d", DIR, 0)
    t.ensure(cur.ino, b"x", FILE, 7)
    memo = t.memo_for(f, "p1", lambda p: len(p) > 100)
    slowest = 0.0
    done = False
    while not done:
        t0 = time.perf_counter()
        done = t.scan_step(f, memo, 256)
        slowest = max(slowest, time.perf_counter() - t0)
    assert t.memo_valid(f, memo, "p1")
    assert {len(p) > 100 for p in t.memo_paths(f, memo, 0)} == {True, False}
    assert slowest < 0.05, f"a step took {slowest * 1000:.0f} ms"
