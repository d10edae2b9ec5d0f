"""Where LMDB's file goes (pages per named database, free pages), and giving free pages back.

LMDB never shrinks its file: pages freed by a commit are reused by later commits, but
while a read transaction holds an older state (the synced-state pin of store.env, every
sync) pages freed since cannot be reused and the file grows by them. A store that was
just imported into is typically half free pages (measured: sqlalchemy, five releases,
data.mdb 4.5 MB of which 2.2 MB free). And a B-tree filled by random keys (fragment
hashes) keeps its pages about two thirds full.

`compact_store` rewrites the environment into a new file, every database in key order
with LMDB's append mode (pages filled whole), and swaps it in. It runs only when the
store is held exclusively (the store lock, and no other process with the environment
open) and the free pages are worth it. Crash-safe: the old file stays in place, synced,
until the new one is complete and fsynced; the saved synced state (`db/synced-meta`,
which names meta pages of the old file) is removed before the swap, and the swap is one
rename. Killed at any point, the store is either the old file or the new one, whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from annofs.store.env import (
    MAP_SIZE,
    SYNCED_META,
    TXNID_AT,
    TXNID_FIELD,
    open_in_this_process,
    recover_after_reboot,
)
from annofs.store.lock import try_exclusive
from annofs.store.packs import fsync_dir

# A rewrite costs reading and writing every used page: only when the file would shrink by
# at least this fraction, and by at least MIN_FREE_BYTES (small stores are left alone).
MIN_FREE_FRACTION = 0.25
MIN_FREE_BYTES = 1 << 20

_TMP = "compact.tmp"  # the new environment is built here, inside db/


@dataclass(frozen=True)
class DbUsage:
    """One named database: records, and the pages its B-tree takes."""

    entries: int
    branch: int
    leaf: int
    overflow: int

    @property
    def pages(self) -> int:
        """Pages of every kind."""
        return self.branch + self.leaf + self.overflow


@dataclass
class EnvUsage:
    """Where an LMDB file's pages go."""

    page_size: int
    file_pages: int  # pages the file holds (last page number + 1)
    dbs: dict[str, DbUsage] = field(default_factory=dict)

    @property
    def used_pages(self) -> int:
        """Pages of the named databases, the main database and the two meta pages."""
        return sum(u.pages for u in self.dbs.values()) + 2

    @property
    def free_pages(self) -> int:
        """Pages no database uses: LMDB's free list (and the pages recording it)."""
        return max(0, self.file_pages - self.used_pages)

    def lines(self) -> list[str]:
        """One line per database with pages, then the free pages: for reports."""
        ps = self.page_size
        out = [f"{name} {u.pages * ps / 1e6:.2f} MB ({u.entries} records in {u.pages} pages: "
               f"{u.branch} branch, {u.leaf} leaf, {u.overflow} overflow)"
               for name, u in sorted(self.dbs.items(), key=lambda kv: -kv[1].pages) if u.pages]
        out.append(f"free pages {self.free_pages * ps / 1e6:.2f} MB ({self.free_pages} pages) of "
                   f"a {self.file_pages * ps / 1e6:.2f} MB file")
        return out


def env_usage(env: lmdb.Environment) -> EnvUsage:
    """Pages per named database (and the main one, as "(main)") and free pages of `env`."""
    info, st = env.info(), env.stat()
    usage = EnvUsage(st["psize"], info["last_pgno"] + 1)
    usage.dbs["(main)"] = _db_usage(st)
    with env.begin() as txn:
        for name in _db_names(txn):
            db = env.open_db(name, txn=txn, create=False)
            usage.dbs[name.decode(errors="replace")] = _db_usage(txn.stat(db))
    return usage


def _db_usage(st: dict[str, int]) -> DbUsage:
    return DbUsage(st["entries"], st["branch_pages"], st["leaf_pages"], st["overflow_pages"])


def _db_names(txn: lmdb.Transaction) -> list[bytes]:
    # The main database of an environment with named databases holds only their names.
    with txn.cursor() as cur:
        return [bytes(k) for k in cur.iternext(values=False)]


@dataclass(frozen=True)
class CompactReport:
    """What a compaction did: the file's size before and after."""

    before: int
    after: int


def compact_store(path: Path, *, locked: bool = False,
                  min_free_fraction: float = MIN_FREE_FRACTION,
                  min_free_bytes: int = MIN_FREE_BYTES) -> CompactReport | None:
    """Rewrite the store's LMDB file without its free pages, if worth it and if nobody else
    has the store open; None if it did nothing.

    `locked`: the caller holds the store lock exclusively (gc, upgrade); otherwise it is
    taken here, without waiting (a mount or another writer: nothing happens). Nothing
    happens either while this process has a Store of it open (LMDB's locks do not keep a
    process from itself): callers close theirs first. Errors (a full disk while writing
    the copy) leave the store as it was and are raised.
    """
    path = Path(path)
    db_dir = path / "db"
    if open_in_this_process(path):
        return None  # LMDB's locks would not keep this process's Store from the old file
    with contextlib.ExitStack() as stack:
        if not locked and not stack.enter_context(try_exclusive(path)):
            return None
        if not stack.enter_context(_env_to_ourselves(db_dir)):
            return None  # a reader that takes no store lock (annofs log, nix serve)
        shutil.rmtree(db_dir / _TMP, ignore_errors=True)  # left by a killed run
        # The file must be the synced state if the machine restarted since it was last
        # open (callers opened it just now, so this does nothing; it costs one read).
        recover_after_reboot(path)
        # No LMDB lock of our own: the lock file's lock above keeps every other opener out.
        env = lmdb.open(str(db_dir), readonly=True, lock=False, max_dbs=64)
        try:
            usage = env_usage(env)
            free = usage.free_pages * usage.page_size
            if free < min_free_bytes or free < min_free_fraction * usage.file_pages * \
                    usage.page_size:
                return None
            txnid = env.info()["last_txnid"]
            try:
                _write_copy(env, db_dir / _TMP, txnid)
            except BaseException:
                shutil.rmtree(db_dir / _TMP, ignore_errors=True)  # a full disk, say
                raise
        finally:
            env.close()
        before = (db_dir / "data.mdb").stat().st_size
        _fsync_file(db_dir / "data.mdb")  # the old file whole on disk until the rename
        # The saved synced state names meta pages of the old file; after a machine crash
        # it would be written over the new one. Both files are wholly synced, so neither
        # needs it: remove it first, then swap.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(db_dir / SYNCED_META)
        fsync_dir(db_dir)
        os.rename(db_dir / _TMP / "data.mdb", db_dir / "data.mdb")
        fsync_dir(db_dir)
        shutil.rmtree(db_dir / _TMP, ignore_errors=True)
        return CompactReport(before, (db_dir / "data.mdb").stat().st_size)


@contextlib.contextmanager
def _env_to_ourselves(db_dir: Path) -> Iterator[bool]:
    """Whether no other process has the environment open, and none can open it until the
    block ends. Every LMDB opener holds a read lock on the first byte of `lock.mdb` (it
    tries a write lock first, to learn whether it is the first opener, then waits for a
    read lock): a write lock on it is ours only when nobody has the store open, and an
    opener arriving meanwhile waits. Such an opener then finds the lock file's state as it
    was (not the first one: it does not reset it), with the last transaction id of the
    old file, which the new file's meta pages carry too (`_set_txnid`)."""
    fd = os.open(db_dir / "lock.mdb", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # lets go of the lock


def _write_copy(env: lmdb.Environment, tmp: Path, txnid: int) -> None:
    """Every database of `env` into a new environment at `tmp`, in key order with append
    (whole pages), with `txnid` as its last transaction id, synced. Checked: each database
    has as many records as the original."""
    tmp.mkdir()
    dst = lmdb.open(str(tmp), map_size=MAP_SIZE, max_dbs=64, sync=False, metasync=False,
                    lock=False)
    try:
        with env.begin() as src, dst.begin(write=True) as w:
            for name in _db_names(src):
                sdb = env.open_db(name, txn=src, create=False)
                flags = [f for f, on in sdb.flags(src).items() if on]
                if flags:  # every annofs database is plain: a copy would lose these
                    raise ValueError(f"database {name!r}: flags {', '.join(flags)} are not "
                                     f"copied")
                ddb = dst.open_db(name, txn=w)
                with src.cursor(db=sdb) as cur, w.cursor(db=ddb) as out:
                    _, added = out.putmulti(cur.iternext(), append=True)
                if added != src.stat(sdb)["entries"]:
                    raise ValueError(f"database {name!r}: copied {added} records of "
                                     f"{src.stat(sdb)['entries']}")
        psize = dst.stat()["psize"]
    finally:
        dst.close()
    _set_txnid(tmp / "data.mdb", psize, txnid)
    _fsync_file(tmp / "data.mdb")


_PGNO = struct.Struct("=Q")  # a page header starts with its page number


def _set_txnid(data: Path, psize: int, txnid: int) -> None:
    """Give the newest state of a fresh LMDB file the transaction id `txnid` (in meta page
    txnid & 1, as LMDB expects; the other meta page: the same state as txnid - 1), as
    `mdb_env_copy` does, so a process that opened the store before the swap continues
    the old numbering consistently (see _env_to_ourselves)."""
    with open(data, "r+b") as f:
        metas = os.pread(f.fileno(), 2 * psize, 0)
        newest = max((0, 1), key=lambda i: TXNID_FIELD.unpack_from(metas, i * psize + TXNID_AT)[0])
        page = bytearray(metas[newest * psize:(newest + 1) * psize])
        out = bytearray(2 * psize)
        for slot, tid in ((txnid & 1, txnid), (1 - (txnid & 1), max(0, txnid - 1))):
            _PGNO.pack_into(page, 0, slot)
            TXNID_FIELD.pack_into(page, TXNID_AT, tid)
            out[slot * psize:(slot + 1) * psize] = page
        os.pwrite(f.fileno(), bytes(out), 0)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


