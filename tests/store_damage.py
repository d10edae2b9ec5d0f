"""Damage to stored fragments as a disk would do it, for the tests of what reads and fsck
make of it: bytes of a pack file flipped or cut off, a pack file gone, an index record
(an LMDB value) changed or lost. Each returns a function that undoes it."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import lmdb

from annofs.store.packs import packs_dir
from annofs.volume import Volume

# content.fragments' index record, as the disk holds it: pack, offset, stored length,
# length, codec, refcount
_INDEX = struct.Struct(">QQIIBQ")
KINDS = ("bit-flip", "truncated-pack", "pack-missing", "length-short", "length-long",
         "length-huge", "unknown-codec", "index-empty", "index-missing")


def first_fragment(vol: Volume) -> bytes:
    """The hash of the first stored fragment (in hash order)."""
    with vol.store.read() as txn:
        for h, _n in vol.fragments.iterate(txn):
            return h
    raise AssertionError("the store holds no fragment")


def stored(vol: Volume, h: bytes) -> bytes:
    """A fragment's stored bytes, as they are in its pack."""
    with vol.store.read() as txn:
        path, offset, n = vol.fragments.locate(txn, h)
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, offset)


def damage(vol: Volume, h: bytes, kind: str, at: int | None = None) -> Callable[[], None]:
    """Damage fragment `h` (see KINDS; `at` picks the flipped byte, by default the middle);
    returns the undo."""
    with vol.store.read() as txn:
        path, offset, n = vol.fragments.locate(txn, h)
        index = bytes(txn.get(h, db=vol.store.db["fragindex"]))
    if kind in ("bit-flip", "truncated-pack", "pack-missing"):
        original = path.read_bytes()
        mode = path.stat().st_mode
        os.chmod(path, 0o600)
        if kind == "bit-flip":
            b = bytearray(original)
            b[offset + (n // 2 if at is None else at)] ^= 0x01
            path.write_bytes(bytes(b))
        elif kind == "truncated-pack":
            os.truncate(path, offset + n - 1)
        else:
            path.unlink()

        def undo_file() -> None:
            path.write_bytes(original)
            os.chmod(path, mode)
        return undo_file
    pack, off, stored_n, length, codec, refs = _INDEX.unpack(index)
    new = {"length-short": _INDEX.pack(pack, off, stored_n - 1, length, codec, refs),
           "length-long": _INDEX.pack(pack, off, stored_n + 1, length, codec, refs),
           "length-huge": _INDEX.pack(pack, off, 0xFFFFFFFF, 0xFFFFFFFF, codec, refs),
           "unknown-codec": _INDEX.pack(pack, off, stored_n, length, 7, refs),
           "index-empty": b"", "index-missing": None}[kind]
    with vol.store.env.begin(write=True) as txn:
        if new is None:
            txn.delete(h, db=vol.store.db["fragindex"])
        else:
            txn.put(h, new, db=vol.store.db["fragindex"])

    def undo_index() -> None:
        with vol.store.env.begin(write=True) as txn:
            txn.put(h, index, db=vol.store.db["fragindex"])
    return undo_index


def put_refcount(vol: Volume, txn: lmdb.Transaction, h: bytes, n: int) -> None:
    """Overwrite fragment `h`'s stored refcount with `n` in its index record, as a flipped
    bit or a bug would (not through FragmentStore, which keeps counts right)."""
    raw = bytes(txn.get(h, db=vol.store.db["fragindex"]))
    txn.put(h, raw[:-8] + struct.pack(">Q", n), db=vol.store.db["fragindex"])


def evict_packs(vol: Volume) -> None:
    """Drop the packs' pages from the page cache (synced first: dirty pages stay), as a
    store not read since boot: the next read of them is a disk read."""
    vol.store.sync()
    for f in packs_dir(vol.store.path).iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
