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
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from annofs.store.env import MAP_SIZE, SYNCED_META, open_env
from annofs.store.lock import try_exclusive

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
        out = [f"{name}: {u.entries} records, {u.pages} pages ({u.branch} branch, {u.leaf} "
               f"leaf, {u.overflow} overflow) = {u.pages * ps / 1e6:.2f} MB"
               for name, u in sorted(self.dbs.items(), key=lambda kv: -kv[1].pages) if u.pages]
        out.append(f"free pages: {self.free_pages} = {self.free_pages * ps / 1e6:.2f} MB of "
                   f"{self.file_pages * ps / 1e6:.2f} MB")
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
    taken here, without waiting (a mount or another writer: nothing happens). The caller
    has closed its own Store. Errors (a full disk while writing the copy) leave the store
    as it was and are raised.
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        if not locked and not stack.enter_context(try_exclusive(path)):
            return None
        db_dir = path / "db"
        shutil.rmtree(db_dir / _TMP, ignore_errors=True)  # left by a killed run
        env = open_env(path)
        try:
            env.reader_check()  # slots of killed processes
            usage = env_usage(env)
            free = usage.free_pages * usage.page_size
            if free < min_free_bytes or free < min_free_fraction * usage.file_pages * \
                    usage.page_size or _others_reading(env):
                return None
            before = (db_dir / "data.mdb").stat().st_size
            env.sync(True)  # the old file whole on disk: it is the store until the rename
            try:
                _write_copy(env, db_dir / _TMP)
                copied = not _others_reading(env)  # one opened the store meanwhile
            except BaseException:
                shutil.rmtree(db_dir / _TMP, ignore_errors=True)  # a full disk, say
                raise
        finally:
            env.close()
        if not copied:
            shutil.rmtree(db_dir / _TMP, ignore_errors=True)
            return None
        # The saved synced state names meta pages of the old file; after a machine crash
        # it would be written over the new one. Both files are wholly synced, so neither
        # needs it: remove it first, then swap.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(db_dir / SYNCED_META)
        _fsync_dir(db_dir)
        os.rename(db_dir / _TMP / "data.mdb", db_dir / "data.mdb")
        _fsync_dir(db_dir)
        shutil.rmtree(db_dir / _TMP, ignore_errors=True)
        return CompactReport(before, (db_dir / "data.mdb").stat().st_size)


def _write_copy(env: lmdb.Environment, tmp: Path) -> None:
    """Every database of `env` into a new environment at `tmp`, in key order with append
    (whole pages), synced. Checked: each database has as many records as the original."""
    tmp.mkdir()
    dst = lmdb.open(str(tmp), map_size=MAP_SIZE, max_dbs=64, sync=False, metasync=False,
                    lock=True)
    try:
        with env.begin() as src, dst.begin(write=True) as w:
            for name in _db_names(src):
                sdb = env.open_db(name, txn=src, create=False)
                if sdb.flags(src)["dupsort"]:
                    raise ValueError(f"database {name!r}: duplicate keys are not copied")
                ddb = dst.open_db(name, txn=w)
                with src.cursor(db=sdb) as cur, w.cursor(db=ddb) as out:
                    _, added = out.putmulti(cur.iternext(), append=True)
                if added != src.stat(sdb)["entries"]:
                    raise ValueError(f"database {name!r}: copied {added} records of "
                                     f"{src.stat(sdb)['entries']}")
        dst.sync(True)
    finally:
        dst.close()


def _others_reading(env: lmdb.Environment) -> bool:
    """Whether another process has this environment open (LMDB's reader table: every
    Store takes a read slot when it opens)."""
    me = os.getpid()
    for line in env.readers().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit() and int(fields[0]) != me:
            return True
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
