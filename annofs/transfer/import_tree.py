"""`annofs import`: copy a host directory into the store, incrementally and atomically.

The import is built in a staging tree that starts as an O(1) clone of the destination and
is swapped in with one transaction at the end: an import that fails half-way (an
unreadable file, a crash) leaves the destination as it was.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import msgpack

from annofs.content.ingest import Ingested, ingest_stream
from annofs.content.versions import EMPTY_VERSION
from annofs.errors import NotADirectoryError_, UsageError
from annofs.namespace.tree import check_name, now_ns
from annofs.store.records import Attrs
from annofs.transfer.hostwalk import git_dirs, git_tracked, is_excluded
from annofs.volume import Volume

Progress = Callable[[int, int], None]  # (files done, bytes read) increments


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
    skipped: list[str] = field(default_factory=list)


def _cache_key(dest: Sequence[bytes], rel: str) -> bytes:
    """The import cache is keyed by the file's full store path."""
    return b"/" + b"/".join([*dest, os.fsencode(rel)])


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class TreeImporter:
    """Imports one host directory to one store path."""

    def __init__(self, vol: Volume, *, excludes: Sequence[str] = (), git: bool = False,
                 progress: Progress | None = None) -> None:
        self.vol = vol
        self.excludes = list(excludes)
        self.git = git
        self.progress = progress
        self.stats = ImportStats()
        self._tracked: set[str] | None = None
        self._tracked_dirs: set[str] = set()
        self._links: dict[tuple[int, int], tuple[list[bytes], bytes]] = {}
        self._cache_db = vol.store.db["importcache"]

    def run(self, src: Path, dest: Sequence[bytes]) -> ImportStats:
        """Import `src` to the store path `dest`; the destination's parent must exist."""
        if not src.exists():
            raise UsageError(f"{src}: no such directory")
        if not src.is_dir():
            raise UsageError(f"{src}: not a directory")
        if not dest:
            raise UsageError("the destination must be below the root, e.g. /src/NAME")
        for name in dest:
            check_name(name)
        if self.git:
            self._tracked = git_tracked(src)
            self._tracked_dirs = git_dirs(self._tracked)
        ns = self.vol.namespace
        parent, name = list(dest[:-1]), dest[-1]
        with self.vol.store.write() as txn:
            base = self._existing_dir(txn, dest)
            self._root = ns.make_staging_root(txn, os.getuid(), os.getgid(), base)
        try:
            self._import_dir(src, "", [], dest)
            st = src.stat()
            with self.vol.store.write() as txn:
                ns.set_root_attrs(txn, lambda a: self._dir_attrs(a, st), self._root)
                # Missing parents are made here, with the swap: a failed import adds nothing.
                dir_id = ns.make_dirs(txn, parent, os.getuid(), os.getgid())
                ns.swap_root_into(txn, self._root, dir_id, name)
        except BaseException:
            with self.vol.store.write() as txn:
                ns.drop_root(txn, self._root)
            raise
        finally:
            self.vol.store.sync()
        return self.stats

    def _existing_dir(self, txn: lmdb.Transaction, dest: Sequence[bytes]) -> Attrs | None:
        """The destination directory if it exists; a non-directory on its path is an error."""
        ns = self.vol.namespace
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

    # -- one directory ------------------------------------------------------------

    def _wanted(self, rel: str, is_dir: bool) -> bool:
        if is_excluded(rel, self.excludes):
            return False
        if self._tracked is None:
            return True
        return rel in (self._tracked_dirs if is_dir else self._tracked)

    def _import_dir(self, host: Path, rel: str, stage: list[bytes], dest: Sequence[bytes]) -> None:
        """Bring the staged directory `stage` in line with the host directory `host`."""
        ns, store = self.vol.namespace, self.vol.store
        with os.scandir(host) as it:
            host_entries = sorted(it, key=lambda e: e.name)
        with store.read() as txn:
            dir_attrs = ns.resolve(txn, stage, self._root)
            present = dict(ns.listdir(txn, dir_attrs.target))
        wanted: dict[bytes, tuple[os.DirEntry, os.stat_result]] = {}
        for e in host_entries:
            child_rel = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            if not self._wanted(child_rel, stat.S_ISDIR(st.st_mode)):
                continue
            if stat.S_ISSOCK(st.st_mode):
                self.stats.skipped.append(child_rel)
                continue
            wanted[os.fsencode(e.name)] = (e, st)
        # Read changed files before taking the write lock (the slow part).
        contents: dict[bytes, tuple[int, bytes, Ingested | int]] = {}
        first_names: set[tuple[int, int]] = set()
        for bname, (e, st) in wanted.items():
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink > 1:
                link_key = (st.st_dev, st.st_ino)
                if link_key in self._links or link_key in first_names:
                    continue  # a later name of a file read under its first name
                first_names.add(link_key)
            child_rel = f"{rel}/{e.name}" if rel else e.name
            contents[bname] = self._file_content(e, st, _cache_key(dest, child_rel),
                                                 present.get(bname))
        subdirs: list[tuple[bytes, Path, str]] = []
        with store.write() as txn:
            dir_id = ns.writable_dir(txn, stage, self._root)
            for bname in present.keys() - wanted.keys():
                ns.remove_tree(txn, dir_id, bname)
                gone = os.fsdecode(bname)
                txn.delete(_cache_key(dest, f"{rel}/{gone}" if rel else gone), db=self._cache_db)
                self.stats.removed += 1
            for bname, (e, st) in wanted.items():
                old = present.get(bname)
                kind = stat.S_IFMT(st.st_mode)
                if old is not None and (stat.S_IFMT(old.mode) != kind or old.link
                                        or (st.st_nlink > 1 and kind == stat.S_IFREG)):
                    ns.remove_tree(txn, dir_id, bname)
                    old = None
                if stat.S_ISDIR(st.st_mode):
                    if old is None:
                        ns.create(txn, dir_id, bname, self._dir_attrs(None, st))
                    subdirs.append((bname, Path(e.path), f"{rel}/{e.name}" if rel else e.name))
                    self.stats.dirs += 1
                elif stat.S_ISREG(st.st_mode):
                    self._put_file(txn, dir_id, stage, bname, st, old, contents.get(bname))
                elif stat.S_ISLNK(st.st_mode):
                    target = os.fsencode(os.readlink(e.path))
                    self._put(txn, dir_id, bname, old, self._attrs(st, target))
                    self.stats.symlinks += 1
                else:  # FIFOs and device nodes keep their type and device number
                    self._put(txn, dir_id, bname, old, self._attrs(st, st.st_rdev))
        for bname, path, child_rel in subdirs:
            self._import_dir(path, child_rel, [*stage, bname], dest)
            st = path.stat()
            with store.write() as txn:
                dir_id = ns.writable_dir(txn, stage, self._root)
                ns.set_attrs(txn, dir_id, bname, lambda a, st=st: self._dir_attrs(a, st))

    # -- files ----------------------------------------------------------------------

    def _file_content(self, e: os.DirEntry, st: os.stat_result, key: bytes,
                      old: Attrs | None) -> tuple[int, bytes, Ingested | int]:
        """(parent version, cache key, what was read or the version reused unread)."""
        # A hard-linked file is re-linked on every import, but its content can be reused.
        reusable = old is not None and old.is_reg
        parent = int(old.target) if reusable and old is not None else EMPTY_VERSION
        with self.vol.store.read() as txn:
            raw = txn.get(key, db=self._cache_db)
        if raw is not None and old is not None:
            cached = msgpack.unpackb(raw)
            if cached[:4] == _stat_key(st) and cached[4] == parent:
                self.stats.files_reused += 1
                self._tick(0)
                return parent, key, parent
        with open(e.path, "rb") as f:
            ingested = ingest_stream(self.vol.store, self.vol.fragments, f, self.vol.params)
        self.stats.files_read += 1
        self.stats.bytes_read += ingested.size
        self.stats.new_bytes += ingested.new_bytes
        self._tick(ingested.size)
        return parent, key, ingested

    def _put_file(self, txn: lmdb.Transaction, dir_id: int, stage: list[bytes], bname: bytes,
                  st: os.stat_result, old: Attrs | None,
                  content: tuple[int, bytes, Ingested | int] | None) -> None:
        ns = self.vol.namespace
        self.stats.files += 1
        link_key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and link_key in self._links:
            first_stage, first_name = self._links[link_key]
            first_dir = ns.writable_dir(txn, first_stage, self._root)
            ns.hard_link(txn, first_dir, first_name, dir_id, bname)
            self.stats.hard_links += 1
            return
        assert content is not None, "the first name of a file is always read"
        parent, key, got = content
        if isinstance(got, int):
            vid = got
        else:
            vid = self.vol.versions.create(txn, parent, got.hashes, got.lengths, got.digest).id
        txn.put(key, msgpack.packb([*_stat_key(st), vid]), db=self._cache_db)
        a = self._attrs(st, vid)
        self._put(txn, dir_id, bname, old, a)
        if st.st_nlink > 1:
            self._links[link_key] = (list(stage), bname)

    def _put(self, txn: lmdb.Transaction, dir_id: int, bname: bytes, old: Attrs | None,
             a: Attrs) -> None:
        ns = self.vol.namespace
        if old is None:
            ns.create(txn, dir_id, bname, a)
        else:
            ns.set_attrs(txn, dir_id, bname,
                         lambda prev: dataclasses.replace(a, xattrs=prev.xattrs))

    # -- attributes -------------------------------------------------------------------

    @staticmethod
    def _attrs(st: os.stat_result, target: int | bytes) -> Attrs:
        size = len(target) if isinstance(target, bytes) else st.st_size
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            size = 0
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
