"""`annofs upgrade`: convert a store of an older format to the current one.

Format 3 kept each fragment as an LMDB value; format 4 keeps them compressed in pack
files (content.fragments); format 5 keeps each fragment's refcount in its index record
instead of a second database. The conversion moves fragments in batches, each stored and
indexed before it leaves LMDB, then merges the counts in batches (a count joins its
record and leaves `fragrefs` in one transaction), so a conversion that is interrupted
(kill -9, a full disk) loses nothing and the next run goes on where it stopped. The
format number changes only once all is converted. Run with the store to itself (see
store.lock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from annofs.content.fragments import FragmentStore
from annofs.store.env import FORMAT_VERSION, open_store


@dataclass
class UpgradeReport:
    """What upgrade did."""

    from_format: int
    fragments_moved: int = 0
    bytes_moved: int = 0
    records_merged: int = 0  # index records given their refcount (format 4 and older)


def upgrade_store(path: Path, progress: Callable[[int, int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> UpgradeReport:
    """Convert the store at `path` to FORMAT_VERSION (nothing to do if it is already)."""
    store = open_store(path, upgrading=True)
    try:
        with store.read() as txn:
            fmt = int(store.get_meta(txn, "format") or b"0")
        rep = UpgradeReport(fmt)
        if fmt == FORMAT_VERSION:
            return rep
        frags = FragmentStore(store)
        with store.read() as txn:
            total = frags.legacy_count(txn)
        if on_total is not None:
            on_total(total)
        while True:
            n, nbytes = frags.upgrade_batch()
            if n == 0:
                break
            rep.fragments_moved += n
            rep.bytes_moved += nbytes
            if progress is not None:
                progress(n, nbytes)
        while (n := frags.merge_refs_batch()) > 0:
            rep.records_merged += n
        with store.write() as txn:
            store.put_meta(txn, "format", str(FORMAT_VERSION).encode())
        return rep
    finally:
        store.close()
