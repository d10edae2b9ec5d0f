"""Whether a directory is as the last import left it, changing nothing: a re-import's hot
path, run by the importer and by its scan helper process (`scanhelper`) side by side.

A directory is *clean* when every host entry is a regular file (one link) or a directory
whose host attributes and stored entry, byte for byte, are what its import-cache record
says they were, and the stored directory has no other entries. A clean directory needs no
change; anything else is left to the importer, which decides what to change.

Only what this needs is imported here (no namespace, no volume): the helper process
starts while the importer has begun scanning, and every import it pays for is time the
two cores do not share the work.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence

import lmdb
import msgpack

from annofs.store.keys import u64
from annofs.transfer.hostwalk import HostFilter

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_IS_REG, _IS_DIR = stat.S_ISREG, stat.S_ISDIR

# A directory to scan: (host path, path below the import's destination, stored node id).
Item = tuple[bytes, tuple[bytes, ...], int]


def list_host_dir(host: bytes) -> list[tuple[bytes, os.stat_result]]:
    """A host directory's entries with their lstat, unsorted."""
    # Through a directory descriptor: each stat is then an fstatat of a name, not a walk
    # of the whole path again (a sixth of a re-import's stat time on linux-6.1). The names
    # are encoded inline: os.fsencode's call per name was a tenth of a re-import.
    fd = os.open(host, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            return [(e.name.encode(_FS_ENCODING, _FS_ERRORS), e.stat(follow_symlinks=False))
                    for e in it]
    finally:
        os.close(fd)


def raw_entries(txn: lmdb.Transaction, entries_db: lmdb._Database,
                dir_id: int) -> dict[bytes, bytes]:
    """A stored directory's entries (name -> encoded record), not decoded: a re-import
    compares them with what it wrote last time, and decoding every entry cost more than
    the rest of an unchanged directory's check."""
    prefix = u64(dir_id)
    out: dict[bytes, bytes] = {}
    with txn.cursor(db=entries_db) as cur:
        if not cur.set_range(prefix):
            return out
        for key, raw in cur:
            if key[:8] != prefix:
                break
            out[bytes(key[8:])] = bytes(raw)
    return out


def cache_key(dest: Sequence[bytes], rel: Sequence[bytes]) -> bytes:
    """A directory's import-cache key: its full store path and a slash (a prefix of its
    subdirectories' keys, so removing a tree's records is one range)."""
    return b"/" + b"/".join([*dest, *rel]) + b"/"


def cached_record(txn: lmdb.Transaction, cache_db: lmdb._Database, key: bytes,
                  max_key: int) -> dict[bytes, list]:
    """A directory's import-cache record (empty if none; keys longer than LMDB takes are
    never cached)."""
    raw = txn.get(key, db=cache_db) if len(key) <= max_key else None
    return msgpack.unpackb(raw) if raw is not None else {}


def file_unchanged(c: list | None, st: os.stat_result, raw: bytes | None) -> bool:
    """A single-link file's host stat and stored entry are those of its record `c`."""
    return (c is not None and c[2] == st.st_ctime_ns and c[1] == st.st_mtime_ns
            and c[0] == st.st_size and c[3] == st.st_ino and c[4] == raw)


def dir_unchanged(c: list | None, st: os.stat_result, raw: bytes | None) -> bool:
    """A subdirectory's host attributes and stored entry are those of its record `c`
    (see dir_record)."""
    return (c is not None and c[0] is None and c[5] == raw and c[1] == st.st_mtime_ns
            and c[2] == st.st_mode and c[3] == st.st_uid and c[4] == st.st_gid)


def dir_record(st: os.stat_result, raw: bytes, target: int) -> list:
    """A subdirectory's import-cache record: the host attributes its stored entry `raw`
    was found or written with, and its node id. A file's record starts with its size, so
    the leading None keeps either from ever matching the other.

    The entry may change after the record is taken (a copy-on-write of the subdirectory
    changes its node id): the next import then finds no match, decodes it, and records it
    again."""
    return [None, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid, raw, target]


class Scanner:
    """Scans directories of one import's staging tree against the host, in a read
    transaction the caller provides."""

    def __init__(self, entries_db: lmdb._Database, cache_db: lmdb._Database, max_key: int,
                 dest: Sequence[bytes], host_filter: HostFilter | None = None) -> None:
        self.entries_db = entries_db
        self.cache_db = cache_db
        self.max_key = max_key
        self.dest = list(dest)  # the import's destination, as store path names
        self.wanted = host_filter.wanted if host_filter is not None else None

    def scan(self, txn: lmdb.Transaction,
             item: Item) -> tuple[int, int, list[Item]] | None:
        """(files, subdirectories, subdirectories to scan next) of a clean directory, in
        name order; None if it is not clean (or cannot be listed: the importer says why)."""
        host, stage, base = item
        try:
            listed = list_host_dir(host)
        except OSError:
            return None
        present = raw_entries(txn, self.entries_db, base)
        wanted = self.wanted
        if wanted is None and len(present) != len(listed):
            return None
        cached = cached_record(txn, self.cache_db, cache_key(self.dest, stage), self.max_key)
        get_cached, get_present = cached.get, present.get
        files, subdirs, taken = 0, [], 0
        for name, st in listed:
            mode = st.st_mode
            if wanted is not None and not wanted(b"/".join((*stage, name)), _IS_DIR(mode)):
                continue
            taken += 1
            if _IS_REG(mode):
                if st.st_nlink != 1 or not file_unchanged(get_cached(name), st,
                                                          get_present(name)):
                    return None
                files += 1
            elif _IS_DIR(mode):
                c = get_cached(name)
                if not dir_unchanged(c, st, get_present(name)):
                    return None
                subdirs.append((name, c[6]))
            else:
                return None
        if taken != len(present):  # the store has entries the host no longer has
            return None
        subdirs.sort()
        return files, len(subdirs), [(host + b"/" + name, (*stage, name), node)
                                     for name, node in subdirs]

