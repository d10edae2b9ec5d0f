"""O(1) copies: copy-on-write independence, copies of copies, hard links, cost in records."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterator

import pytest

from annofs.content.versions import EMPTY_VERSION
from annofs.errors import ExistsError, InvalidOperationError
from annofs.maintenance.fsck import check_store
from annofs.namespace.tree import new_file_attrs
from annofs.volume import Volume


@pytest.fixture
def vol(vol: Volume) -> Iterator[Volume]:
    """The conftest store, checked by fsck after every test."""
    yield vol
    rep = check_store(vol)
    assert rep.ok, "\n".join(rep.problems)


def p(path: str) -> list[bytes]:
    return [part.encode() for part in path.strip("/").split("/") if part]


def mkfile(vol: Volume, path: str, mode: int = 0o644) -> None:
    with vol.store.write() as txn:
        d = vol.namespace.make_dirs(txn, p(path)[:-1], 0, 0)
        vol.namespace.create(txn, d, p(path)[-1], new_file_attrs(stat.S_IFREG | mode, 0, 0))


def mode_of(vol: Volume, path: str) -> int:
    with vol.store.read() as txn:
        return stat.S_IMODE(vol.namespace.resolve(txn, p(path)).mode)


def chmod(vol: Volume, path: str, mode: int) -> None:
    with vol.store.write() as txn:
        d = vol.namespace.writable_dir(txn, p(path)[:-1])
        vol.namespace.set_attrs(txn, d, p(path)[-1], lambda a: dataclasses.replace(
            a, mode=stat.S_IFMT(a.mode) | mode))


def names(vol: Volume, path: str) -> list[bytes]:
    with vol.store.read() as txn:
        a = vol.namespace.resolve(txn, p(path))
        return [n for n, _a in vol.namespace.listdir(txn, int(a.target))]


def count(vol: Volume, db: str) -> int:
    with vol.store.read() as txn:
        return txn.stat(vol.store.db[db])["entries"]


def cp(vol: Volume, src: str, dst: str) -> None:
    with vol.store.write() as txn:
        vol.namespace.copy(txn, p(src), p(dst))


def test_changes_on_either_side_stay_there(vol: Volume) -> None:
    for f in ("a/x", "a/sub/y", "a/sub/deep/z"):
        mkfile(vol, f)
    cp(vol, "/a", "/b")
    chmod(vol, "/b/sub/deep/z", 0o600)
    mkfile(vol, "/a/sub/new")
    with vol.store.write() as txn:
        vol.namespace.remove(txn, vol.namespace.writable_dir(txn, p("b")), b"x")
    assert mode_of(vol, "/a/sub/deep/z") == 0o644
    assert mode_of(vol, "/b/sub/deep/z") == 0o600
    assert names(vol, "/a/sub") == [b"deep", b"new", b"y"]
    assert names(vol, "/b/sub") == [b"deep", b"y"]
    assert names(vol, "/a") == [b"sub", b"x"]
    assert names(vol, "/b") == [b"sub"]


def test_copies_of_copies_rename_and_delete(vol: Volume) -> None:
    mkfile(vol, "/a/d/f")
    cp(vol, "/a", "/b")
    cp(vol, "/b", "/c")
    with vol.store.write() as txn:
        ns = vol.namespace
        c_d = ns.writable_dir(txn, p("c/d"))
        raw = ns.detach(txn, c_d, b"f")
        ns.attach(txn, ns.writable_dir(txn, p("c")), b"moved", raw)
        ns.remove(txn, ns.writable_dir(txn, p("b/d")), b"f")
    assert names(vol, "/a/d") == [b"f"]
    assert names(vol, "/b/d") == []
    assert names(vol, "/c") == [b"d", b"moved"]
    assert names(vol, "/c/d") == []


def test_copy_costs_records_not_files(vol: Volume) -> None:
    for i in range(50):
        for j in range(20):
            mkfile(vol, f"/tree/d{i}/f{j}")
    entries, dirs = count(vol, "entries"), count(vol, "dirs")
    cp(vol, "/tree", "/copy")
    assert count(vol, "entries") == entries + 1  # one new name, nothing else
    assert count(vol, "dirs") == dirs


def test_hard_links_inside_a_copy_are_its_own(vol: Volume) -> None:
    mkfile(vol, "/a/f")
    mkfile(vol, "/a/out")
    with vol.store.write() as txn:
        ns = vol.namespace
        a = ns.writable_dir(txn, p("a"))
        sub = ns.make_dirs(txn, p("a/sub"), 0, 0)
        ns.hard_link(txn, a, b"f", sub, b"g")
        ns.hard_link(txn, a, b"out", ns.make_dirs(txn, p("elsewhere"), 0, 0), b"o2")
    cp(vol, "/a", "/b")
    chmod(vol, "/b/f", 0o600)
    assert mode_of(vol, "/b/sub/g") == 0o600  # one file inside the copy
    assert mode_of(vol, "/a/f") == mode_of(vol, "/a/sub/g") == 0o644  # the original untouched
    with vol.store.read() as txn:
        ns = vol.namespace
        assert ns.nlink(txn, ns.resolve(txn, p("a/f"))) == 2
        b_dir = int(ns.resolve(txn, p("b")).target)
        f_link = ns.raw_entry(txn, b_dir, b"f").link
        assert f_link and ns.get_link(txn, f_link).nlink == 2
        # "out" has its other name outside the copy: a plain file in the copy.
        assert ns.raw_entry(txn, b_dir, b"out").link == 0


def test_copy_refusals(vol: Volume) -> None:
    mkfile(vol, "/a/f")
    mkfile(vol, "/g")
    with pytest.raises(InvalidOperationError, match="into itself"):
        cp(vol, "/a", "/a/inner")
    with pytest.raises(ExistsError):
        cp(vol, "/a/f", "/g")
    cp(vol, "/g", "/a")  # into an existing directory
    assert names(vol, "/a") == [b"f", b"g"]


def test_copied_file_keeps_its_history(vol: Volume) -> None:
    data = b"version one\n"
    from array import array

    from annofs.content.fragments import fragment_hash

    h = fragment_hash(data)
    vol.fragments.put_many([(h, data)])
    with vol.store.write() as txn:
        v = vol.versions.create(txn, EMPTY_VERSION, h, array("I", [len(data)]), h)
        d = vol.namespace.make_dirs(txn, p("a"), 0, 0)
        a = dataclasses.replace(new_file_attrs(stat.S_IFREG | 0o644, 0, 0), target=v.id,
                                size=len(data))
        vol.namespace.create(txn, d, b"f", a)
    cp(vol, "/a/f", "/b")
    with vol.store.read() as txn:
        assert vol.namespace.resolve(txn, p("b")).target == v.id
