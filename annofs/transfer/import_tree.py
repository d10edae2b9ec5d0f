"""`annofs import`: copy a host directory into the store, incrementally and atomically.

The import is built in a staging tree that starts as an O(1) clone of the destination and
is swapped in with one transaction at the end: an import that fails half-way (an
unreadable file, a crash) leaves the destination as it was. Into a mounted store, the
daemon makes the staging root and swaps it in (`Staging`; its caches must learn of the
swap), and the importing command fills it beside the daemon.

How it goes fast (SPEC §8: a first import no slower than `cp -a`, a re-import after a
small change in proportion to the change):

- The walk (scandir, lstat, the import cache) runs here; reading, chunking and hashing
  run in worker processes (`readers`), which store the fragments themselves.
- Changes to the staging tree are queued and applied in few large write transactions:
  a commit per file was most of the time before (each rewrote the B-tree pages it
  touched). No write transaction is ever open while waiting for a worker, which needs the
  same (cross-process) writer lock.
- The import cache holds one record per directory: for each file imported there, the host
  stat it was read at (size, mtime_ns, ctime_ns, inode) and the entry as written to the
  store. A file is unchanged when both match, so an unchanged directory costs one cache
  read and one scan of its stored entries, with nothing decoded.
- Only this import changes the staging tree, and only after reading what it replaces, so
  the walk reads each directory's entries as they were without holding a snapshot.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lmdb
import msgpack

from annofs.content.ingest import Ingested
from annofs.content.versions import EMPTY_VERSION
from annofs.errors import CorruptionError, NotADirectoryError_, UsageError
from annofs.namespace.tree import check_name, now_ns
from annofs.store.records import Attrs, Version, decode_attrs, encode_attrs
from annofs.transfer.hostwalk import HostFilter, git_listing, tracked_paths
from annofs.transfer.readers import BatchResult, ReadError, ReadPool, default_workers
from annofs.transfer.scan import (
    Item,
    Scanner,
    cache_key,
    cached_record,
    dir_record,
    dir_unchanged,
    file_unchanged,
    list_host_dir,
    raw_entries,
)
from annofs.transfer.scanhelper import ScanHelper
from annofs.volume import Volume

Progress = Callable[[int, int], None]  # (files done, bytes read) increments
Op = Callable[[lmdb.Transaction], None]

# Queued staging-tree changes applied per write transaction. Large enough that commits are
# rare, small enough that other writers are not held off for long: the readers, which
# commit their fragments under the same writer lock, wait for each of these transactions
# (20k changes held it 1.6-3.8 s on linux-source-6.1 at load 4-5; cold imports with 4k:
# 20.5, 21.3, 22.6 s against 21.4, 25.0, 30.6 s with 20k. The LMDB file grows more meanwhile,
# 385 MB against 255 MB, 42 MB once compacted at the end), as does a mount sharing the store.
OPS_PER_TXN = 4_000
# The walk's read snapshot is renewed after this many directories or seconds, whichever
# comes first: while the readers commit fragments, an older snapshot keeps LMDB from
# reusing the pages their commits free (1000 directories alone: the store grew by 40%).
READS_PER_SNAPSHOT = 1000
# A re-import starts its scan helper (`scanhelper`) after scanning this many directories
# with more still to go: a small tree is scanned before a helper would have started.
SCAN_HELPER_AFTER = 64
SNAPSHOT_SECONDS = 0.05


@dataclass
class ImportStats:
    """What an import did."""

    files: int = 0
    files_read: int = 0
    files_reused: int = 0
    bytes_read: int = 0
    new_bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    hard_links: int = 0
    removed: int = 0
    workers: int = 0
    scan_requests: int = 0  # subtrees a re-import's scan helper was given
    scan_helper_died: bool = False  # it ended early: the importer scanned its part


class Staging(Protocol):
    """Where the staging tree is made and swapped in: the store itself, or a mount's daemon
    (which must see the swap to keep its caches right)."""

    def begin(self, dest: Sequence[bytes]) -> str:
        """A new staging root cloned from `dest` (empty if it does not exist)."""

    def finish(self, root: str, dest: Sequence[bytes]) -> None:
        """Make the staging tree `dest`, in one step."""


def existing_dir(vol: Volume, txn: lmdb.Transaction, dest: Sequence[bytes]) -> Attrs | None:
    """The destination directory if it exists; a non-directory on its path is an error."""
    ns = vol.namespace
    a = ns.root(txn)
    for i, name in enumerate(dest):
        child = ns.get(txn, int(a.target), name)
        if child is None:
            return None
        if not child.is_dir and i < len(dest) - 1:
            shown = "/" + b"/".join(dest[: i + 1]).decode(errors="replace")
            raise NotADirectoryError_(f"{shown}: not a directory")
        a = child
    return a if a.is_dir else None


def begin_staging(vol: Volume, txn: lmdb.Transaction, dest: Sequence[bytes], uid: int,
                  gid: int) -> str:
    """A staging root starting as an O(1) clone of `dest` (what begin does, in `txn`)."""
    return vol.namespace.make_staging_root(txn, uid, gid, existing_dir(vol, txn, dest))


def finish_staging(vol: Volume, txn: lmdb.Transaction, root: str, dest: Sequence[bytes],
                   uid: int, gid: int) -> None:
    """Swap a staging root in as `dest`; missing parents are made here, with the swap, so a
    failed import adds nothing."""
    ns = vol.namespace
    if not root.startswith("staging:"):
        raise UsageError(f"{root}: not a staging tree")
    ns.root(txn, root)  # NotFoundError if it was dropped (by gc, say)
    existing_dir(vol, txn, dest)  # a file on the way is an error, as at the start
    dir_id = ns.make_dirs(txn, list(dest[:-1]), uid, gid)
    ns.swap_root_into(txn, root, dir_id, dest[-1])


class LocalStaging:
    """Staging in a store this process has to itself (no mount)."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol

    def begin(self, dest: Sequence[bytes]) -> str:
        """See Staging."""
        with self.vol.store.write() as txn:
            return begin_staging(self.vol, txn, dest, os.getuid(), os.getgid())

    def finish(self, root: str, dest: Sequence[bytes]) -> None:
        """See Staging."""
        with self.vol.store.write() as txn:
            finish_staging(self.vol, txn, root, dest, os.getuid(), os.getgid())


@dataclass
class _Dir:
    """A directory being imported, until every read its files wait for is applied."""

    stage: tuple[bytes, ...]
    key: bytes
    record: dict[bytes, list]
    pending: int = 0
    changed: bool = False
    walked: bool = False


@dataclass
class _Read:
    """A file waiting for its read: where its result goes."""

    d: _Dir
    name: bytes
    st: os.stat_result
    parent: int  # the version it replaces (EMPTY_VERSION if none)
    exists: bool  # whether the staging tree has a plain-file entry of that name
    link_key: tuple[int, int] | None


def _prefetch(src: bytes, stop: threading.Event) -> None:
    """List and stat the tree ahead of the walk, in the same order, so that the walk finds
    directory and inode metadata in the kernel's caches. When the tree is not cached,
    the walk's reads of metadata, one at a time, were a third of a cold import; this
    thread waits on the disk for them (the GIL is released in the system calls) while
    the walk and the readers get on."""
    stack = [src]
    try:
        while stack and not stop.is_set():
            with os.scandir(stack.pop()) as it:
                entries = sorted(it, key=lambda e: e.name)
            subdirs = []
            for e in entries:
                e.stat(follow_symlinks=False)
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
            stack.extend(reversed(subdirs))
    except OSError:
        return  # the walk itself meets and reports the problem


_first = operator.itemgetter(0)


class TreeImporter:
    """Imports one host directory to one store path."""

    def __init__(self, vol: Volume, *, excludes: Sequence[str] = (), git: bool = False,
                 progress: Progress | None = None, workers: int | None = None,
                 batch_files: int = 2048, batch_bytes: int = 32 << 20,
                 ops_per_txn: int = OPS_PER_TXN,
                 scan_helper_after: int | None = SCAN_HELPER_AFTER,
                 to_read: Callable[[int], None] | None = None) -> None:
        """`to_read(nbytes)` learns of each file the walk finds to read, with its size,
        as `progress` learns of each file read: a progress bar's growing total."""
        self.vol = vol
        self.to_read = to_read
        self.scan_helper_after = scan_helper_after
        self.ops_per_txn = ops_per_txn
        self.excludes = list(excludes)
        self.git = git
        self.progress = progress
        self.workers = default_workers() if workers is None else workers
        self.batch_files = batch_files
        self.batch_bytes = batch_bytes
        self.stats = ImportStats()
        self._filter: HostFilter | None = None
        self._git_listing: tuple[bytes, bytes] | None = None
        self._cache_db = vol.store.db["importcache"]
        # Directories whose key is longer (thousands of levels deep) are not cached:
        # they are read again on every import.
        self._max_key = vol.store.env.max_key_size()
        self._ops: list[Op] = []
        self._wdirs: dict[tuple[bytes, ...], int] = {}
        self._link_first: dict[tuple[int, int], tuple[tuple[bytes, ...], bytes]] = {}
        self._link_later: list[tuple[tuple[int, int], tuple[bytes, ...], bytes, bytes]] = []
        self._link_vid: dict[tuple[int, int], int] = {}  # version each first name got
        self._root = ""
        self._empty: Version | None = None  # the empty file's version (see _parent)
        self._snap: lmdb.Transaction | None = None
        self._snap_uses = 0
        self._snap_since = 0.0

    def run(self, src: Path, dest: Sequence[bytes], *,
            staging: Staging | None = None) -> ImportStats:
        """Import `src` to the store path `dest`; missing parents of `dest` are made."""
        if not src.exists():
            raise UsageError(f"{src}: no such directory")
        if not src.is_dir():
            raise UsageError(f"{src}: not a directory")
        if not dest:
            raise UsageError("the destination must be below the root, e.g. /src/NAME")
        for name in dest:
            check_name(name)
        if self.git:
            self._git_listing = git_listing(src)
        if self.git or self.excludes:
            self._filter = HostFilter(self.excludes, None if self._git_listing is None
                                      else tracked_paths(*self._git_listing))
        staging = staging or LocalStaging(self.vol)
        dest = list(dest)
        self._root = staging.begin(dest)
        pool = ReadPool(self.vol.store, self.vol.fragments, self.vol.params,
                        workers=self.workers, done=self._read_done,
                        batch_files=self.batch_files, batch_bytes=self.batch_bytes)
        try:
            # Absolute: the readers are other processes, whatever their working directory.
            self._walk(pool, os.fsencode(os.path.abspath(src)), dest)
            pool.finish()
            self.stats.workers = pool.started_workers
            top = src.stat()
            self._ops.append(lambda txn: self.vol.namespace.set_root_attrs(
                txn, lambda a: self._dir_attrs(a, top), self._root))
            self._ops.extend(self._link_ops())
            self._flush()
            staging.finish(self._root, dest)
        except BaseException:
            pool.close()
            self._ops.clear()
            with self.vol.store.write() as txn:
                if self.vol.store.get_meta(txn, self._root) is not None:
                    self.vol.namespace.drop_root(txn, self._root)
            raise
        finally:
            pool.close()
            self.vol.store.sync()
        return self.stats

    # -- the walk -------------------------------------------------------------------

    def _walk(self, pool: ReadPool, src: bytes, dest: list[bytes]) -> None:
        """Every directory, parents before children.

        A re-import (the destination has entries) first scans each directory for changes
        without changing anything (`scan`), here and in a helper process, and only a
        directory that is not clean goes through `_import_dir`; a first import goes through
        it directory by directory.

        A directory's stored node (`base`) is read when it is reached, in a read transaction
        renewed often (READS_PER_SNAPSHOT): a snapshot held for the whole import kept LMDB
        from reusing any page freed meanwhile (the store grew by 40% on a first import), one
        per directory cost a tenth of a re-import of a tree of small directories. Any
        snapshot taken since the staging root was made will do: nodes the staging tree
        reaches change only through this import's own queued changes, which touch only
        directories already scanned or walked (and, copying on write, their ancestors,
        scanned before them), and their cache records. A copy leaves the node ids below
        it as they were, and nothing frees a node the staging tree still reaches, so
        any id read in any of those snapshots stays readable.
        """
        with self.vol.store.read() as txn:
            top = int(self.vol.namespace.root(txn, self._root).target)
            first = self.vol.namespace.is_empty(txn, top)
        try:
            if first:
                self._walk_all(pool, [(src, (), top)], dest, prefetch=True)
            else:
                self._walk_scanning(pool, (src, (), top), dest)
        finally:
            if self._snap is not None:
                self._snap.abort()
                self._snap = None

    def _walk_all(self, pool: ReadPool, stack: list[tuple[bytes, tuple[bytes, ...], int | None]],
                  dest: list[bytes], *, prefetch: bool = False) -> None:
        """`_import_dir` for every directory below those on `stack`, depth first in name
        order; `prefetch`: list the tree ahead (a first import, see _prefetch)."""
        stop = threading.Event()
        ahead = threading.Thread(target=_prefetch, args=(stack[0][0], stop), daemon=True,
                                 name="import-prefetch")
        if prefetch:
            ahead.start()
        try:
            while stack:
                host, stage, base = stack.pop()
                subdirs = self._import_dir(pool, host, stage, base, dest)
                stack.extend(reversed(subdirs))
                if len(self._ops) >= self.ops_per_txn:
                    self._flush()
        finally:
            stop.set()
            if prefetch:
                ahead.join()

    def _walk_scanning(self, pool: ReadPool, top: Item, dest: list[bytes]) -> None:
        """Scan the stored tree against the host, on both cores once it proves large
        (`scan_helper_after` directories), and import what is not clean."""
        scanner = Scanner(self.vol.store.db["entries"], self._cache_db, self._max_key,
                          dest, self._filter)
        pile: collections.deque[Item] = collections.deque([top])  # right end: next here
        helper: ScanHelper | None = None
        scanned = 0
        try:
            while True:
                if helper is not None:
                    for answer in helper.take():
                        self._count_clean(answer.files, answer.dirs)
                        for item in answer.dirty:
                            self._import_changed(pool, item, dest, pile)
                        pile.extendleft(reversed(answer.rest))  # the helper's next
                    helper.feed(pile)
                if pile:
                    item = pile.pop()
                    got = scanner.scan(self._reader(), item)
                    if got is None:
                        self._import_changed(pool, item, dest, pile)
                    else:
                        self._count_clean(got[0], got[1])
                        pile.extend(reversed(got[2]))
                    scanned += 1
                    if (helper is None and self.scan_helper_after is not None
                            and scanned >= self.scan_helper_after and pile):
                        helper = ScanHelper(self.vol.store.path, dest,
                                            self._max_key, self.excludes,
                                            self._git_listing)
                elif helper is not None and helper.busy:
                    helper.wait()
                else:
                    break
                if len(self._ops) >= self.ops_per_txn:
                    self._flush()
        finally:
            if helper is not None:
                helper.close()
                self.stats.scan_requests = helper.requests
                self.stats.scan_helper_died = helper.died

    def _import_changed(self, pool: ReadPool, item: Item, dest: list[bytes],
                        pile: collections.deque[Item]) -> None:
        """`_import_dir` for a directory that is not clean: its stored subdirectories
        go on the pile to scan, new ones are imported whole at once."""
        new: list[tuple[bytes, tuple[bytes, ...], int | None]] = []
        for sub in reversed(self._import_dir(pool, *item, dest)):
            if sub[2] is None:
                new.append(sub)
            else:
                pile.append((sub[0], sub[1], sub[2]))
        if new:
            self._walk_all(pool, new, dest)

    def _count_clean(self, files: int, dirs: int) -> None:
        self.stats.files += files
        self.stats.files_reused += files
        self.stats.dirs += dirs
        if files and self.progress:
            self.progress(files, 0)

    def _reader(self) -> lmdb.Transaction:
        """The walk's read transaction, renewed now and then (see _walk)."""
        self._snap_uses += 1
        now = time.monotonic()
        if (self._snap is None or self._snap_uses >= READS_PER_SNAPSHOT
                or now - self._snap_since > SNAPSHOT_SECONDS):
            if self._snap is not None:
                self._snap.abort()
            self._snap = self.vol.store.env.begin(buffers=False)
            self._snap_uses, self._snap_since = 0, now
        return self._snap

    def _import_dir(self, pool: ReadPool, host: bytes,
                    stage: tuple[bytes, ...], base: int | None,
                    dest: list[bytes]) -> list[tuple[bytes, tuple[bytes, ...], int | None]]:
        """Queue what makes the staged directory `stage` match the host directory `host`;
        returns its subdirectories to walk next, with their stored node ids (None: new)."""
        ns, stats = self.vol.namespace, self.stats
        listed = sorted(list_host_dir(host), key=_first)
        d = _Dir(stage, cache_key(dest, stage), {})
        present: dict[bytes, bytes] = {}
        cached: dict[bytes, list] = {}
        if base is not None:
            txn = self._reader()
            present = raw_entries(txn, self.vol.store.db["entries"], base)
            cached = cached_record(txn, self._cache_db, d.key, self._max_key)
        subdirs: list[tuple[bytes, tuple[bytes, ...], int | None]] = []
        takes = self._filter.wanted if self._filter is not None else None
        # The unchanged file is the hot path of a re-import: locals, counts kept here.
        get_cached, get_present, record = cached.get, present.get, d.record
        is_reg, is_dir = stat.S_ISREG, stat.S_ISDIR
        seen = 0  # wanted names the stored directory has (the others are new)
        wanted: list[bytes] = []
        files = reused = 0
        for name, st in listed:
            mode = st.st_mode
            if takes is not None and not takes(b"/".join([*stage, name]), is_dir(mode)):
                continue
            raw = get_present(name)
            if is_reg(mode) and st.st_nlink == 1:
                c = get_cached(name)
                if file_unchanged(c, st, raw):
                    record[name] = c
                    seen += 1
                    wanted.append(name)
                    files += 1
                    reused += 1
                    continue
            seen += raw is not None
            wanted.append(name)
            if is_reg(mode):
                files += 1
                if st.st_nlink > 1:
                    self._hard_linked(pool, d, host + b"/" + name, name, st, raw, get_cached(name))
                    continue
                old = self._decode(raw, d, name) if raw is not None else None
                if old is not None and (not old.is_reg or old.link):
                    self._remove(d, name)
                    old = None
                d.changed = True
                d.pending += 1
                self._add(pool, host + b"/" + name, st, _Read(
                    d, name, st, int(old.target) if old is not None else EMPTY_VERSION,
                    old is not None, None))
            elif is_dir(mode):
                stats.dirs += 1
                # An unchanged subdirectory: its entry is byte for byte the one recorded
                # with the host's attributes last time, so nothing is decoded (decoding
                # each was a tenth of a re-import). See dir_record.
                c = get_cached(name)
                if dir_unchanged(c, st, raw):
                    record[name] = c
                    subdirs.append((host + b"/" + name, (*stage, name), c[6]))
                    continue
                old = self._decode(raw, d, name) if raw is not None else None
                if old is not None and (not old.is_dir or old.link):
                    self._remove(d, name)
                    old = None
                if old is None:
                    self._queue(d, lambda txn, d=d, name=name, st=st: self._made_dir(
                        d, name, st, ns.create(txn, self._wdir(txn, d.stage), name,
                                               self._dir_attrs(None, st))))
                    subdirs.append((host + b"/" + name, (*stage, name), None))
                else:
                    # Compared in place: no would-be entry built per unchanged directory.
                    if (old.mode, old.uid, old.gid, old.mtime_ns, old.size) != (
                            st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, 0):
                        self._queue(d, lambda txn, d=d, name=name, st=st: self._made_dir(
                            d, name, st, ns.set_attrs(
                                txn, self._wdir(txn, d.stage), name,
                                lambda a, st=st: self._dir_attrs(a, st))))
                    else:
                        rec = dir_record(st, raw, int(old.target))
                        if rec != c:
                            record[name] = rec
                            d.changed = True  # only for the record (kept from now on)
                    subdirs.append((host + b"/" + name, (*stage, name), int(old.target)))
            else:
                if stat.S_ISLNK(mode):
                    target: int | bytes = os.readlink(host + b"/" + name)
                    stats.symlinks += 1
                else:  # FIFOs, sockets, device nodes: their type and device number
                    target = st.st_rdev
                new = self._attrs(st, target)
                old = self._decode(raw, d, name) if raw is not None else None
                if old is not None and (stat.S_IFMT(old.mode) != stat.S_IFMT(mode) or old.link):
                    self._remove(d, name)
                    old = None
                if old is None or not self._same(old, new):
                    self._queue(d, lambda txn, d=d, name=name, new=new, old=old: self._put(
                        txn, self._wdir(txn, d.stage), name, old is not None, new))
        stats.files += files
        stats.files_reused += reused
        if reused and self.progress:
            self.progress(reused, 0)
        if seen < len(present):
            for name in present.keys() - set(wanted):
                self._remove(d, name)
        d.walked = True
        self._settle(d)
        return subdirs

    def _hard_linked(self, pool: ReadPool, d: _Dir, path: bytes,
                     name: bytes, st: os.stat_result, raw: bytes | None,
                     c: list | None) -> None:
        """A file with several names: the first is read (or reused), the others are linked
        to it once every file is in. Its names are made afresh on every import."""
        if raw is not None:
            self._remove(d, name, counted=False)
        vid = EMPTY_VERSION
        if raw is not None:
            old = decode_attrs(raw, "entry")
            if old.link:
                with self.vol.store.read() as txn:
                    vid = int(self.vol.namespace.link_attrs(txn, old.link).target)
            elif old.is_reg:
                vid = int(old.target)
        key = (st.st_dev, st.st_ino)
        if key in self._link_first:
            self._link_later.append((key, d.stage, name, d.key))
            self.stats.hard_links += 1
            # Recorded too: which name comes first can change between imports (with the
            # scan helper it depends on timing), and a first name without a record was
            # read again. The stored content's version: right unless the file changed
            # now, when the next import reads it once more.
            d.record[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, b"", vid]
            return
        self._link_first[key] = (d.stage, name)
        d.changed = True
        if (c is not None and vid != EMPTY_VERSION and c[5] == vid
                and c[:4] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]):
            self.stats.files_reused += 1
            self._tick(0)
            self._queue(d, lambda txn: self._put_file(txn, d, name, st, vid, False, key))
            return
        d.pending += 1
        self._add(pool, path, st, _Read(d, name, st, vid, False, key))

    def _add(self, pool: ReadPool, path: bytes, st: os.stat_result, tag: _Read) -> None:
        """Hand a file to the readers (and its size to the progress total)."""
        if self.to_read is not None:
            self.to_read(st.st_size)
        pool.add(path, st.st_size, tag)

    def _link_ops(self) -> list[Op]:
        ns = self.vol.namespace

        def link(txn: lmdb.Transaction, key: tuple[int, int], stage: tuple[bytes, ...],
                 name: bytes) -> None:
            first_stage, first_name = self._link_first[key]
            ns.hard_link(txn, self._wdir(txn, first_stage), first_name,
                         self._wdir(txn, stage), name)

        def record_versions(txn: lmdb.Transaction) -> None:
            """Each later name's cache record gets the version its first name got (known
            only now), so that it is found unchanged next time if it comes first then."""
            by_dir: dict[bytes, list[tuple[bytes, int]]] = {}
            for k, _s, n, dkey in self._link_later:
                if k in self._link_vid and len(dkey) <= self._max_key:
                    by_dir.setdefault(dkey, []).append((n, self._link_vid[k]))
            for dkey, names in by_dir.items():
                raw = txn.get(dkey, db=self._cache_db)
                if raw is None:
                    continue
                record, changed = msgpack.unpackb(raw), False
                for n, vid in names:
                    c = record.get(n)
                    if c is not None and c[4] == b"" and c[5] != vid:
                        c[5], changed = vid, True
                if changed:
                    txn.put(dkey, msgpack.packb(record), db=self._cache_db)

        return [*(lambda txn, k=k, s=s, n=n: link(txn, k, s, n)
                  for k, s, n, _dkey in self._link_later), record_versions]

    # -- results of reads -------------------------------------------------------------

    def _read_done(self, tags: list[object], result: BatchResult) -> None:
        """A batch's fragments are committed: queue its files' versions and entries."""
        stats = self.stats
        stats.new_bytes += result.new_bytes
        for tag, got in zip(tags, result.files, strict=True):
            if isinstance(got, ReadError):
                raise got.exception()
            assert isinstance(tag, _Read)
            stats.files_read += 1
            stats.bytes_read += got.size - got.hole_bytes  # a sparse file's holes are not read
            self._tick(got.size)
            self._queue(tag.d, lambda txn, tag=tag, got=got: self._put_file(
                txn, tag.d, tag.name, tag.st, got, tag.exists, tag.link_key, tag.parent))
            tag.d.pending -= 1
            self._settle(tag.d)
        if len(self._ops) >= self.ops_per_txn:
            self._flush()

    def _put_file(self, txn: lmdb.Transaction, d: _Dir, name: bytes, st: os.stat_result,
                  content: Ingested | int, exists: bool, link_key: tuple[int, int] | None,
                  parent: int = EMPTY_VERSION) -> None:
        if isinstance(content, int):
            vid = content
        else:
            vid = self.vol.versions.create(txn, self._parent(txn, parent), content.hashes,
                                           content.lengths, content.digest).id
        written = self._put(txn, self._wdir(txn, d.stage), name, exists, self._attrs(st, vid))
        if link_key is not None:
            self._link_vid[link_key] = vid
        # Hard-linked names are remade on every import: only the content is looked up.
        d.record[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                          b"" if link_key is not None else written, vid]

    def _parent(self, txn: lmdb.Transaction, vid: int) -> int | Version:
        """The version a new one derives from: the empty file's decoded once per import
        (every new file's parent; fetching and decoding it each time was a tenth of a first
        import's main process), any other by id."""
        if vid != EMPTY_VERSION:
            return vid
        if self._empty is None:
            self._empty = self.vol.versions.get(txn, EMPTY_VERSION)
        return self._empty

    @staticmethod
    def _made_dir(d: _Dir, name: bytes, st: os.stat_result, written: Attrs) -> None:
        d.record[name] = dir_record(st, encode_attrs(written), int(written.target))

    # -- queued changes ---------------------------------------------------------------

    def _queue(self, d: _Dir, op: Op) -> None:
        d.changed = True
        self._ops.append(op)

    def _remove(self, d: _Dir, name: bytes, *, counted: bool = True) -> None:
        """Queue the removal of an entry (and, for a directory, of its cache records);
        `counted`: the host has no such entry any more (not: it is made again)."""
        ns = self.vol.namespace
        sub_key = d.key + name + b"/"

        def remove(txn: lmdb.Transaction) -> None:
            ns.remove_tree(txn, self._wdir(txn, d.stage), name)
            if len(sub_key) > self._max_key:
                return  # every record below would have a longer key: there are none
            with txn.cursor(db=self._cache_db) as cur:
                if cur.set_range(sub_key):
                    while cur.key().startswith(sub_key):
                        if not cur.delete():
                            break
        self.stats.removed += counted
        self._queue(d, remove)

    def _settle(self, d: _Dir) -> None:
        """Once a walked directory has every read applied, queue its new cache record."""
        if not (d.walked and d.pending == 0 and d.changed):
            return

        def settle(txn: lmdb.Transaction) -> None:
            if len(d.key) <= self._max_key:
                txn.put(d.key, msgpack.packb(d.record), db=self._cache_db)
            # Nothing more is written there (hard links are placed at the end, looked up
            # again): the id cache holds the directories in progress, not the whole tree.
            self._wdirs.pop(d.stage, None)
        self._ops.append(settle)

    def _flush(self) -> None:
        """Apply the queued changes in one write transaction."""
        ops, self._ops = self._ops, []
        if not ops:
            return
        try:
            with self.vol.store.write() as txn:
                for op in ops:
                    op(txn)
        except BaseException:
            self._wdirs.clear()  # ids made by copying in the aborted transaction never existed
            raise

    def _wdir(self, txn: lmdb.Transaction, stage: tuple[bytes, ...]) -> int:
        """The writable node id of a staged directory. Once made exclusive (copied from the
        destination it was cloned from) it stays so: nothing else sees the staging tree."""
        dir_id = self._wdirs.get(stage)
        if dir_id is None:
            dir_id = self.vol.namespace.writable_dir(txn, list(stage), self._root)
            self._wdirs[stage] = dir_id
        return dir_id

    def _put(self, txn: lmdb.Transaction, dir_id: int, bname: bytes, exists: bool,
             a: Attrs) -> bytes:
        """Create or update an entry (keeping its extended attributes); the record written."""
        ns = self.vol.namespace
        if not exists:
            return encode_attrs(ns.create(txn, dir_id, bname, a))
        return encode_attrs(ns.set_attrs(
            txn, dir_id, bname, lambda prev: dataclasses.replace(a, xattrs=prev.xattrs)))

    # -- attributes -------------------------------------------------------------------

    @staticmethod
    def _decode(raw: bytes, d: _Dir, name: bytes) -> Attrs:
        try:
            return decode_attrs(raw, "entry")
        except CorruptionError as e:  # named here: formatting the name for each entry cost
            raise CorruptionError(f"entry {name!r} of staged directory {d.key!r}: "
                                  f"{str(e).removeprefix('entry: ')}") from e

    @staticmethod
    def _same(old: Attrs, new: Attrs) -> bool:
        """Whether an entry already says what the host says (times of access and change
        are not compared: reading the host tree changes them)."""
        return (old.mode, old.uid, old.gid, old.size, old.mtime_ns, old.target) == (
            new.mode, new.uid, new.gid, new.size, new.mtime_ns, new.target)

    @staticmethod
    def _attrs(st: os.stat_result, target: int | bytes) -> Attrs:
        size = len(target) if isinstance(target, bytes) else st.st_size
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            size = 0  # a special file: the host's size says nothing
        return Attrs(st.st_mode, st.st_uid, st.st_gid, size, st.st_atime_ns, st.st_mtime_ns,
                     now_ns(), target)

    @staticmethod
    def _dir_attrs(old: Attrs | None, st: os.stat_result) -> Attrs:
        a = TreeImporter._attrs(st, 0)
        return dataclasses.replace(a, target=old.target if old else 0, size=0,
                                   xattrs=old.xattrs if old else {})

    def _tick(self, nbytes: int) -> None:
        if self.progress:
            self.progress(1, nbytes)
