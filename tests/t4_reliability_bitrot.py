"""Bit rot, SPEC §9: a flipped bit in a stored fragment, version record, directory entry,
directory node or hard-link record is caught where it is read: EIO through the mount,
never wrong bytes; the daemon logs it and keeps serving every other file; `annofs fsck`
names the damaged record and exits 1.

The bit is flipped directly in LMDB or in a pack file (as the disk would), in a store
imported from a host tree, with the store unmounted; then the store is mounted and read.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from fuse_helpers import annofs
from store_damage import damage

from annofs.store.keys import entry_key, u64
from annofs.volume import Volume

BIG = random.Random(3).randbytes(600_000)  # several fragments
FILES = {"big.bin": BIG, "small.txt": b"hello\n", "dir/inner.txt": b"inner\n",
         "dir/sub/deep.txt": b"deep\n", "other/ok.txt": b"ok\n", "other/hard": b"linked\n"}


@dataclass
class Damaged:
    """A store with one flipped bit, mounted."""

    m: Mount
    what: str  # the record fsck must name, as it names it


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store holding FILES under /t (written through a mount) and a hard link."""
    store = tmp_path / "store"
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   stdout=subprocess.DEVNULL)
    m = Mount(store, tmp_path / "mnt")
    m.path.mkdir()
    m.start()
    try:
        for name, data in FILES.items():
            (m.path / "t" / name).parent.mkdir(parents=True, exist_ok=True)
            (m.path / "t" / name).write_bytes(data)
        os.link(m.path / "t" / "other" / "hard", m.path / "t" / "other" / "hard2")
    finally:
        m.stop()
    return store


def flip(store: Path, kind: str, seed: int) -> str:
    """Flip one bit (chosen by `seed`) of one record; returns how fsck names it."""
    vol = Volume.open(store)
    try:
        ns, db = vol.namespace, vol.store.db
        with vol.store.write() as txn:
            t_dir = int(ns.resolve(txn, [b"t"]).target)
            big = ns.resolve(txn, [b"t", b"big.bin"])
            dir_id = int(ns.resolve(txn, [b"t", b"dir"]).target)
            if kind == "fragment":
                v = vol.versions.get(txn, int(big.target))
                assert v.count >= 3
                h = v.fragment_hash(1)
                with vol.store.read() as rtxn:
                    n = vol.fragments.locate(rtxn, h)[2]
                # In its pack file, as the disk would flip it.
                damage(vol, h, "bit-flip", at=random.Random(seed).randrange(n))
                return f"fragment {h.hex()}"
            elif kind == "version":
                table, key, name = "versions", u64(int(big.target)), f"version {big.target}"
            elif kind == "entry":
                table, key = "entries", entry_key(dir_id, b"inner.txt")
                name = f"entry b'inner.txt' of directory {dir_id}"
            elif kind == "directory":
                table, key, name = "dirs", u64(dir_id), f"directory {dir_id}"
            else:
                link = ns.link_id_at(txn, int(ns.resolve(txn, [b"t", b"other"]).target),
                                     b"hard")
                assert link
                table, key, name = "links", u64(link), f"link {link}"
            raw = bytearray(txn.get(key, db=db[table]))
            bit = random.Random(seed).randrange(len(raw) * 8)
            raw[bit // 8] ^= 1 << (bit % 8)
            txn.put(key, bytes(raw), db=db[table])
            assert t_dir
    finally:
        vol.close()
    return name


@pytest.fixture
def damaged(request: pytest.FixtureRequest, store: Path, tmp_path: Path) -> Iterator[Damaged]:
    kind, seed = request.param
    what = flip(store, kind, seed)
    m = Mount(store, tmp_path / "mnt")
    m.start()
    try:
        yield Damaged(m, what)
    finally:
        m.stop()


def read_errno(path: Path) -> int | bytes:
    """The file's bytes, or the errno reading it failed with."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno or 0


def healthy(m: Mount, *, skip: tuple[str, ...]) -> None:
    """Every file outside the damage reads back exactly; the daemon is alive."""
    for name, data in FILES.items():
        if name not in skip:
            assert (m.path / "t" / name).read_bytes() == data, name
    assert m.proc is not None and m.proc.poll() is None, "the daemon died"


def logged_corruption(m: Mount, what: str) -> None:
    """The daemon logged the damage (and nothing else) as errors."""
    lines = m.log_problems()
    assert lines, "the daemon logged nothing about the damage"
    unexpected = [ln for ln in lines if what not in ln]
    assert not unexpected, "the daemon logged other problems:\n" + "\n".join(unexpected)


def fsck_names(store: Path, what: str) -> None:
    res = annofs("--store", str(store), "fsck", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith(what + ":"), f"fsck's first line does not name {what}:\n{res.stdout}"
    assert "checksum" in first or "does not match its hash" in first, first


SEEDS = range(6 if os.environ.get("ANNOFS_FULL") == "1" else 2)


@pytest.mark.parametrize("damaged", [("fragment", s) for s in SEEDS], indirect=True)
def test_flipped_fragment_bit(damaged: Damaged) -> None:
    m = damaged.m
    assert read_errno(m.path / "t" / "big.bin") == errno.EIO
    with open(m.path / "t" / "big.bin", "rb") as f:
        assert f.read(1000) == BIG[:1000]  # the fragments before the damaged one still read
    healthy(m, skip=("big.bin",))
    m.stop()
    logged_corruption(m, damaged.what)
    fsck_names(m.store, damaged.what)


@pytest.mark.parametrize("damaged", [("version", s) for s in SEEDS], indirect=True)
def test_flipped_version_record_bit(damaged: Damaged) -> None:
    m = damaged.m
    assert read_errno(m.path / "t" / "big.bin") == errno.EIO
    healthy(m, skip=("big.bin",))
    m.stop()
    logged_corruption(m, damaged.what)
    fsck_names(m.store, damaged.what)


@pytest.mark.parametrize("damaged", [("entry", s) for s in SEEDS], indirect=True)
def test_flipped_directory_entry_bit(damaged: Damaged) -> None:
    m = damaged.m
    assert read_errno(m.path / "t" / "dir" / "inner.txt") == errno.EIO
    with pytest.raises(OSError) as e:
        os.listdir(m.path / "t" / "dir")
    assert e.value.errno == errno.EIO
    healthy(m, skip=("dir/inner.txt",))  # dir/sub/deep.txt too: a lookup needs one entry
    m.stop()
    logged_corruption(m, damaged.what)
    fsck_names(m.store, damaged.what)


@pytest.mark.parametrize("damaged", [("directory", s) for s in SEEDS], indirect=True)
def test_flipped_directory_node_bit(damaged: Damaged) -> None:
    m = damaged.m
    # The node's counts give the directory's link count: it cannot be looked up, and so
    # nothing below it either; the rest of the tree is served, and can be changed.
    for name in ("dir/inner.txt", "dir/sub/deep.txt"):
        assert read_errno(m.path / "t" / name) == errno.EIO
    healthy(m, skip=("dir/inner.txt", "dir/sub/deep.txt"))
    (m.path / "t" / "other" / "new").write_bytes(b"x")
    assert (m.path / "t" / "other" / "new").read_bytes() == b"x"
    m.stop()
    logged_corruption(m, damaged.what)
    fsck_names(m.store, damaged.what)


@pytest.mark.parametrize("damaged", [("link", s) for s in SEEDS], indirect=True)
def test_flipped_hard_link_record_bit(damaged: Damaged) -> None:
    m = damaged.m
    for name in ("hard", "hard2"):
        assert read_errno(m.path / "t" / "other" / name) == errno.EIO
    healthy(m, skip=("other/hard",))
    m.stop()
    logged_corruption(m, damaged.what)
    fsck_names(m.store, damaged.what)


def test_flipped_counter_bit_never_replaces_a_record(store: Path, tmp_path: Path) -> None:
    """The version counter is a bare number: one that went down (a cleared bit) would
    give a new version the id of another file's, silently replacing its content."""
    vol = Volume.open(store)
    try:
        with vol.store.write() as txn:
            n = int.from_bytes(vol.store.get_meta(txn, "next:version") or b"", "big")
            vol.store.put_meta(txn, "next:version", u64(n & ~(1 << (n.bit_length() - 1))))
    finally:
        vol.close()
    res = annofs("--store", str(store), "fsck", check=False)
    assert res.returncode == 1 and res.stdout.startswith("counter next:version: "), res.stdout
    m = Mount(store, tmp_path / "mnt")
    m.start()
    try:
        with pytest.raises(OSError) as e:
            (m.path / "t" / "small.txt").write_bytes(b"a new version")
        assert e.value.errno == errno.EIO
        # The kernel sends RELEASE after close() returned, queued behind nothing: an open
        # that comes first shares the writer's unflushed bytes (and their failed commit).
        # Read once the writer is gone, as any later reader would.
        deadline = time.monotonic() + 10
        while not any("release: counter" in ln for ln in m.log_problems()):
            assert time.monotonic() < deadline, "the writer's release never came"
            time.sleep(0.01)
        healthy(m, skip=())  # nothing replaced
    finally:
        m.stop()
    logged_corruption(m, "counter next:version")
    res = annofs("--store", str(store), "fsck", "--repair", check=False)
    assert res.returncode == 0 and "repaired: counter next:version" in res.stdout, res.stdout
    m.start()
    try:
        (m.path / "t" / "small.txt").write_bytes(b"a new version")
        assert (m.path / "t" / "small.txt").read_bytes() == b"a new version"
        healthy(m, skip=("small.txt",))
    finally:
        m.stop()
