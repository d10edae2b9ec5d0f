"""Directory nodes and their entries.

A directory node is shared between trees while its refcount is above one. Every change
goes through `writable_dir`, which walks from the root and copies each shared node on the
way (path copying, as btrfs does with shared tree blocks): copying one directory's
entries costs that directory's size, once; an O(1) copy of a tree is one more reference.
"""

from __future__ import annotations

import dataclasses
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lmdb

from annofs.content.versions import EMPTY_VERSION
from annofs.errors import (
    ExistsError,
    InvalidOperationError,
    NameTooLongError,
    NotADirectoryError_,
    NotEmptyError,
    NotFoundError,
    UsageError,
)
from annofs.store import Store
from annofs.store.keys import entry_key, u64
from annofs.store.records import (
    Attrs,
    DirHeader,
    Link,
    decode_attrs,
    decode_dir,
    decode_link,
    encode_attrs,
    encode_dir,
    encode_link,
)

MAX_NAME = 255

Path_ = Sequence[bytes]


def check_name(name: bytes) -> None:
    """Reject names no POSIX directory can hold."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UsageError(f"{name!r}: not a valid file name")
    if len(name) > MAX_NAME:
        raise NameTooLongError(f"{name[:40]!r}...: name longer than {MAX_NAME} bytes")


def split_path(path: str | bytes) -> list[bytes]:
    """'/a/b' -> [b'a', b'b'] for paths inside the store's namespace ('/' is the root)."""
    raw = path.encode() if isinstance(path, str) else path
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise UsageError(f"{raw.decode(errors='replace')}: '..' is not allowed in store paths")
    return parts


def now_ns() -> int:
    """The time stamps entries get."""
    return time.time_ns()


class Namespace:
    """Entries, directory nodes and hard-link records, inside caller-owned transactions."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._dirs = store.db["dirs"]
        self._entries = store.db["entries"]
        self._links = store.db["links"]
        # Bumped whenever a shared directory is copied, whenever a directory node gains a
        # reference (it becomes shared: a path made exclusive may no longer be), and
        # whenever a write transaction aborts (a copy made in it never existed): dir ids
        # cached above us go stale.
        self.cow_epoch = 0
        store.on_abort.append(self._forget_cached_ids)

    def _forget_cached_ids(self) -> None:
        self.cow_epoch += 1

    # -- the root -----------------------------------------------------------------

    def ensure_root(self, txn: lmdb.Transaction, uid: int, gid: int) -> None:
        """Create the root directory of a new store."""
        if self._store.get_meta(txn, "root") is not None:
            return
        dir_id = self._new_dir(txn)
        t = now_ns()
        attrs = Attrs(stat.S_IFDIR | 0o755, uid, gid, 0, t, t, t, dir_id)
        self._store.put_meta(txn, "root", encode_attrs(attrs))

    def root(self, txn: lmdb.Transaction, root: str = "root") -> Attrs:
        """A root directory's attributes (target: its dir id)."""
        raw = self._store.get_meta(txn, root)
        if raw is None:
            raise NotFoundError(f"the store has no {root} directory")
        return decode_attrs(raw, f"{root} directory")

    def _set_root(self, txn: lmdb.Transaction, attrs: Attrs, root: str = "root") -> None:
        self._store.put_meta(txn, root, encode_attrs(attrs))

    def make_staging_root(self, txn: lmdb.Transaction, uid: int, gid: int,
                          base: Attrs | None = None) -> str:
        """A tree outside the visible one, for building a change atomically.

        With `base` (a directory's entry) it starts as an O(1) clone of that directory,
        else empty.
        """
        name = f"staging:{self._store.next_id(txn, 'staging')}"
        if base is not None and base.is_dir and not base.link:
            self._set_root(txn, self.share(txn, base), name)
        else:
            t = now_ns()
            self._set_root(txn, Attrs(stat.S_IFDIR | 0o755, uid, gid, 0, t, t, t,
                                      self._new_dir(txn)), name)
        return name

    def drop_root(self, txn: lmdb.Transaction, root: str) -> None:
        """Release a staging tree and everything only it references."""
        a = self.root(txn, root)
        txn.delete(root.encode(), db=self._store.db["meta"])
        self._unref_target(txn, a)

    def staging_roots(self, txn: lmdb.Transaction) -> list[str]:
        """Staging trees left behind (by a crash mid-import): gc drops them."""
        with txn.cursor(db=self._store.db["meta"]) as cur:
            if not cur.set_range(b"staging:"):
                return []
            return [bytes(k).decode() for k in cur.iternext(values=False)
                    if bytes(k).startswith(b"staging:")]

    # -- directory nodes ----------------------------------------------------------

    def _new_dir(self, txn: lmdb.Transaction) -> int:
        dir_id = self._store.next_id(txn, "dir")
        txn.put(u64(dir_id), encode_dir(DirHeader(1, 0)), db=self._dirs)
        return dir_id

    def header(self, txn: lmdb.Transaction, dir_id: int) -> DirHeader:
        """A directory node's header."""
        raw = txn.get(u64(dir_id), db=self._dirs)
        if raw is None:
            raise NotFoundError(f"directory node {dir_id}: missing")
        return decode_dir(dir_id, raw)

    def is_exclusive(self, txn: lmdb.Transaction, dir_id: int) -> bool:
        """Whether a directory node exists and only one entry refers to it."""
        raw = txn.get(u64(dir_id), db=self._dirs)
        return raw is not None and decode_dir(dir_id, raw).refcount == 1

    def _put_header(self, txn: lmdb.Transaction, dir_id: int, h: DirHeader) -> None:
        txn.put(u64(dir_id), encode_dir(h), db=self._dirs)

    def _adjust_subdirs(self, txn: lmdb.Transaction, dir_id: int, delta: int) -> None:
        h = self.header(txn, dir_id)
        self._put_header(txn, dir_id, dataclasses.replace(h, nsubdirs=h.nsubdirs + delta))

    def _ref_target(self, txn: lmdb.Transaction, a: Attrs) -> None:
        """One more entry points at what `a` points at (a dir node or a link)."""
        if a.link:
            link = self.get_link(txn, a.link)
            self._put_link(txn, a.link, dataclasses.replace(link, nlink=link.nlink + 1))
        elif a.is_dir:
            h = self.header(txn, a.target)
            self._put_header(txn, a.target, dataclasses.replace(h, refcount=h.refcount + 1))
            self.cow_epoch += 1

    def _unref_target(self, txn: lmdb.Transaction, a: Attrs) -> None:
        """An entry pointing at `a`'s target went away; free nodes nothing uses."""
        pending = [a]
        while pending:
            a = pending.pop()
            if a.link:
                link = self.get_link(txn, a.link)
                if link.nlink > 1:
                    self._put_link(txn, a.link, dataclasses.replace(link, nlink=link.nlink - 1))
                else:
                    txn.delete(u64(a.link), db=self._links)
            elif a.is_dir:
                h = self.header(txn, a.target)
                if h.refcount > 1:
                    self._put_header(txn, a.target, dataclasses.replace(h, refcount=h.refcount - 1))
                    continue
                for name, child in list(self._iter_raw(txn, a.target)):
                    txn.delete(entry_key(a.target, name), db=self._entries)
                    pending.append(child)
                txn.delete(u64(a.target), db=self._dirs)

    def _copy_dir(self, txn: lmdb.Transaction, dir_id: int) -> int:
        """Copy a shared directory node: its entries now point at shared children."""
        new_id = self._store.next_id(txn, "dir")
        old = self.header(txn, dir_id)
        for name, child in self._iter_raw(txn, dir_id):
            txn.put(entry_key(new_id, name), encode_attrs(child), db=self._entries)
            self._ref_target(txn, child)
        self._put_header(txn, new_id, DirHeader(1, old.nsubdirs))
        self._put_header(txn, dir_id, dataclasses.replace(old, refcount=old.refcount - 1))
        self.cow_epoch += 1
        return new_id

    # -- reading ------------------------------------------------------------------

    def _get_raw(self, txn: lmdb.Transaction, dir_id: int, name: bytes) -> Attrs | None:
        raw = txn.get(entry_key(dir_id, name), db=self._entries)
        if raw is None:
            return None
        return decode_attrs(raw, f"entry {name!r} of directory {dir_id}")

    def get(self, txn: lmdb.Transaction, dir_id: int, name: bytes) -> Attrs | None:
        """The attributes of `name` in a directory, or None.

        A hard-linked file's are its shared ones, with `link` set to the link id (the
        link record stores them with link=0), so callers can tell and count its names.
        """
        a = self._get_raw(txn, dir_id, name)
        if a is not None and a.link:
            return self._linked_attrs(txn, a.link)
        return a

    def _linked_attrs(self, txn: lmdb.Transaction, link_id: int) -> Attrs:
        return dataclasses.replace(self.get_link(txn, link_id).attrs, link=link_id)

    def link_attrs(self, txn: lmdb.Transaction, link_id: int) -> Attrs:
        """A hard-linked file's shared attributes, with `link` set to its id."""
        return self._linked_attrs(txn, link_id)

    def get_link(self, txn: lmdb.Transaction, link_id: int) -> Link:
        """A hard-link record."""
        raw = txn.get(u64(link_id), db=self._links)
        if raw is None:
            raise NotFoundError(f"link {link_id}: missing")
        return decode_link(link_id, raw)

    def _put_link(self, txn: lmdb.Transaction, link_id: int, link: Link) -> None:
        txn.put(u64(link_id), encode_link(link), db=self._links)

    def _iter_raw(self, txn: lmdb.Transaction, dir_id: int,
                  after: bytes | None = None) -> Iterator[tuple[bytes, Attrs]]:
        prefix = u64(dir_id)
        with txn.cursor(db=self._entries) as cur:
            start = prefix + after if after is not None else prefix
            if not cur.set_range(start):
                return
            if after is not None and cur.key() == start and not cur.next():
                return
            for key, raw in cur:
                if key[:8] != prefix:
                    return
                name = bytes(key[8:])
                yield name, decode_attrs(raw, f"entry {name!r} of directory {dir_id}")

    def listdir(self, txn: lmdb.Transaction, dir_id: int,
                after: bytes | None = None) -> Iterator[tuple[bytes, Attrs]]:
        """Entries of a directory in name order, hard links resolved; resumes after `after`."""
        for name, a in self._iter_raw(txn, dir_id, after):
            yield name, (self._linked_attrs(txn, a.link) if a.link else a)

    def iter_entries(self, txn: lmdb.Transaction,
                     dir_id: int) -> Iterator[tuple[bytes, Attrs, int]]:
        """(name, attributes, hard-link id or 0) for each entry, in name order."""
        for name, a in self._iter_raw(txn, dir_id):
            if a.link:
                yield name, self._linked_attrs(txn, a.link), a.link
            else:
                yield name, a, 0

    def is_empty(self, txn: lmdb.Transaction, dir_id: int) -> bool:
        """Whether a directory has no entries."""
        return next(self._iter_raw(txn, dir_id), None) is None

    def resolve(self, txn: lmdb.Transaction, path: Path_, root: str = "root") -> Attrs:
        """The attributes at a path (no symlinks followed); NotFound / NotADirectory."""
        a = self.root(txn, root)
        for i, name in enumerate(path):
            if not a.is_dir:
                raise NotADirectoryError_(f"{_show(path[:i])}: not a directory")
            child = self.get(txn, a.target, name)
            if child is None:
                raise NotFoundError(f"{_show(path[: i + 1])}: no such file or directory")
            a = child
        return a

    def link_id_at(self, txn: lmdb.Transaction, dir_id: int, name: bytes) -> int:
        """The hard-link id of an entry, 0 if it is not hard-linked."""
        a = self._get_raw(txn, dir_id, name)
        return a.link if a is not None else 0

    def nlink(self, txn: lmdb.Transaction, a: Attrs) -> int:
        """st_nlink: names of a hard link; 2 + subdirectories for a directory."""
        if a.is_dir:
            return 2 + self.header(txn, a.target).nsubdirs
        if a.link:
            return self.get_link(txn, a.link).nlink
        return 1

    # -- changing -------------------------------------------------------------------

    def writable_dir(self, txn: lmdb.Transaction, path: Path_, root: str = "root") -> int:
        """The id of the directory at `path`, made exclusive to this path by path copying."""
        top = self.root(txn, root)
        cur = top.target
        if self.header(txn, cur).refcount > 1:
            cur = self._copy_dir(txn, cur)
            self._set_root(txn, dataclasses.replace(top, target=cur), root)
        for i, name in enumerate(path):
            a = self._get_raw(txn, cur, name)
            if a is None:
                raise NotFoundError(f"{_show(path[: i + 1])}: no such file or directory")
            if not a.is_dir:
                raise NotADirectoryError_(f"{_show(path[: i + 1])}: not a directory")
            child = a.target
            if self.header(txn, child).refcount > 1:
                child = self._copy_dir(txn, child)
                txn.put(entry_key(cur, name), encode_attrs(dataclasses.replace(a, target=child)),
                        db=self._entries)
            cur = child
        return cur

    def make_dirs(self, txn: lmdb.Transaction, path: Path_, uid: int, gid: int) -> int:
        """`mkdir -p`: the writable directory at `path`, creating what is missing."""
        for i, name in enumerate(path):
            parent = self.writable_dir(txn, path[:i])
            if self.get(txn, parent, name) is None:
                self.create(txn, parent, name, new_file_attrs(stat.S_IFDIR | 0o755, uid, gid))
        return self.writable_dir(txn, path)

    def create(self, txn: lmdb.Transaction, dir_id: int, name: bytes, a: Attrs) -> Attrs:
        """Add a new entry to a writable directory; a directory entry gets a fresh node."""
        check_name(name)
        if txn.get(entry_key(dir_id, name), db=self._entries) is not None:
            raise ExistsError(f"{name.decode(errors='replace')}: already exists")
        if a.is_dir:
            a = dataclasses.replace(a, target=self._new_dir(txn))
            self._adjust_subdirs(txn, dir_id, +1)
        txn.put(entry_key(dir_id, name), encode_attrs(a), db=self._entries)
        return a

    def set_attrs(self, txn: lmdb.Transaction, dir_id: int, name: bytes,
                  change: Callable[[Attrs], Attrs]) -> Attrs:
        """Change an existing entry's attributes (a hard link's shared record) in place."""
        raw = self._get_raw(txn, dir_id, name)
        if raw is None:
            raise NotFoundError(f"{name.decode(errors='replace')}: no such file or directory")
        if raw.link:
            return self.set_link_attrs(txn, raw.link, change)
        new = change(raw)
        txn.put(entry_key(dir_id, name), encode_attrs(new), db=self._entries)
        return new

    def set_root_attrs(self, txn: lmdb.Transaction, change: Callable[[Attrs], Attrs],
                       root: str = "root") -> Attrs:
        """Change a root directory's own attributes."""
        new = change(self.root(txn, root))
        self._set_root(txn, new, root)
        return new

    def remove(self, txn: lmdb.Transaction, dir_id: int, name: bytes, *,
               want_dir: bool | None = None) -> Attrs:
        """Remove an entry (rmdir semantics for directories: it must be empty)."""
        a = self.get(txn, dir_id, name)
        if a is None:
            raise NotFoundError(f"{name.decode(errors='replace')}: no such file or directory")
        if want_dir is True and not a.is_dir:
            raise NotADirectoryError_(f"{name.decode(errors='replace')}: not a directory")
        if want_dir is False and a.is_dir:
            from annofs.errors import IsADirectoryError_

            raise IsADirectoryError_(f"{name.decode(errors='replace')}: is a directory")
        if a.is_dir:
            if not self.is_empty(txn, a.target):
                raise NotEmptyError(f"{name.decode(errors='replace')}: directory not empty")
            self._adjust_subdirs(txn, dir_id, -1)
        raw = self._get_raw(txn, dir_id, name)
        assert raw is not None
        txn.delete(entry_key(dir_id, name), db=self._entries)
        self._unref_target(txn, raw)
        return a

    def detach(self, txn: lmdb.Transaction, dir_id: int, name: bytes) -> Attrs:
        """Take an entry out without releasing what it points at (the first half of a move)."""
        raw = self._get_raw(txn, dir_id, name)
        if raw is None:
            raise NotFoundError(f"{name.decode(errors='replace')}: no such file or directory")
        txn.delete(entry_key(dir_id, name), db=self._entries)
        if raw.is_dir:
            self._adjust_subdirs(txn, dir_id, -1)
        return raw

    def attach(self, txn: lmdb.Transaction, dir_id: int, name: bytes, raw: Attrs) -> None:
        """Put a detached entry back under a (new) name; the name must be free."""
        check_name(name)
        txn.put(entry_key(dir_id, name), encode_attrs(raw), db=self._entries)
        if raw.is_dir:
            self._adjust_subdirs(txn, dir_id, +1)

    def remove_tree(self, txn: lmdb.Transaction, dir_id: int, name: bytes) -> Attrs:
        """Remove an entry and, for a directory, everything below it that nothing else uses."""
        raw = self.detach(txn, dir_id, name)
        self._unref_target(txn, raw)
        return raw

    def clone_entry(self, txn: lmdb.Transaction, raw: Attrs, dst_dir: int, name: bytes) -> None:
        """Add another reference to an entry's content under a new name (copy-on-write).

        O(1) for any tree without hard links: the directory node becomes shared and
        whichever side changes first copies it.
        """
        check_name(name)
        if txn.get(entry_key(dst_dir, name), db=self._entries) is not None:
            raise ExistsError(f"{name.decode(errors='replace')}: already exists")
        self.attach(txn, dst_dir, name, self.share(txn, raw))

    def copy(self, txn: lmdb.Transaction, src: Path_, dst: Path_) -> list[bytes]:
        """`cp -a SRC DST` in O(1): into DST if it is a directory, else as DST.

        Returns the path of the new entry. A directory cannot be copied into itself: with
        shared nodes that would make the tree a cycle.
        """
        if not src:
            raise InvalidOperationError("cannot copy the root directory")
        dst_attrs = self._try_resolve(txn, dst)
        if dst_attrs is not None:
            if not dst_attrs.is_dir:
                raise ExistsError(f"{_show(dst)}: already exists")
            dst = [*dst, src[-1]]
            if self._try_resolve(txn, dst) is not None:
                raise ExistsError(f"{_show(dst)}: already exists")
        if not dst:
            raise InvalidOperationError("cannot copy onto the root directory")
        if list(dst[: len(src)]) == list(src):
            raise InvalidOperationError(f"cannot copy {_show(src)} into itself ({_show(dst)})")
        parent = self.resolve(txn, dst[:-1])
        if not parent.is_dir:
            raise NotADirectoryError_(f"{_show(dst[:-1])}: not a directory")
        src_dir = self.writable_dir(txn, src[:-1])
        raw = self._get_raw(txn, src_dir, src[-1])
        if raw is None:
            raise NotFoundError(f"{_show(src)}: no such file or directory")
        shared = self.share(txn, raw)
        self.attach(txn, self.writable_dir(txn, dst[:-1]), dst[-1], shared)
        return list(dst)

    def _try_resolve(self, txn: lmdb.Transaction, path: Path_) -> Attrs | None:
        try:
            return self.resolve(txn, path)
        except (NotFoundError, NotADirectoryError_):
            return None

    def share(self, txn: lmdb.Transaction, raw: Attrs) -> Attrs:
        """An entry for a copy of `raw`'s content, holding its own reference.

        Invariant kept here: a shared directory node never contains hard links. Hard
        links are the one thing path copying cannot separate (their names may sit in any
        directory of the tree), so a subtree holding some is copied on the way to them,
        with fresh link records that count only the names inside the copy (cp -a
        semantics); everything else below stays shared.
        """
        if raw.link:
            # A single hard-linked file copied alone is a new, independent file.
            return dataclasses.replace(self.get_link(txn, raw.link).attrs, link=0)
        if not raw.is_dir or not self._store_has_links(txn):
            self._ref_target(txn, raw)
            return raw
        remap: dict[int, int] = {}
        names: dict[int, list[tuple[int, bytes]]] = {}
        copied = self._copy_hard_linked(txn, int(raw.target), remap, names)
        if copied is None:
            self._ref_target(txn, raw)
            return raw
        for new_link, places in names.items():
            link = self.get_link(txn, new_link)
            if len(places) == 1:
                # Only one name inside the copy: a plain file there.
                dir_id, entry_name = places[0]
                txn.put(entry_key(dir_id, entry_name),
                        encode_attrs(dataclasses.replace(link.attrs, link=0)), db=self._entries)
                txn.delete(u64(new_link), db=self._links)
            else:
                self._put_link(txn, new_link, dataclasses.replace(link, nlink=len(places)))
        return dataclasses.replace(raw, target=copied)

    def _store_has_links(self, txn: lmdb.Transaction) -> bool:
        with txn.cursor(db=self._links) as cur:
            return cur.first()

    def _copy_hard_linked(self, txn: lmdb.Transaction, dir_id: int, remap: dict[int, int],
                          names: dict[int, list[tuple[int, bytes]]]) -> int | None:
        """Copy `dir_id` if hard links lie below it (sharing what has none); else None.

        Depth first with an explicit stack, not recursion: a tree may be thousands of
        levels deep. A directory is copied after its subdirectories, as it needs their ids.
        """
        # Per directory being walked: [dir id, its entries, next index, planned, found]
        stack: list[list[Any]] = [[dir_id, list(self._iter_raw(txn, dir_id)), 0, [], False]]
        child: int | None = None
        returning = False
        while True:
            frame = stack[-1]
            entries, planned = frame[1], frame[3]
            if returning:  # the subdirectory at frame[2] is done: `child` is its copy
                name, a = entries[frame[2]]
                if child is not None:
                    frame[4] = True
                    planned.append((name, dataclasses.replace(a, target=child), "copied"))
                else:
                    planned.append((name, a, "share"))
                frame[2] += 1
                returning = False
            descended = False
            while frame[2] < len(entries):
                name, a = entries[frame[2]]
                if a.link:
                    frame[4] = True
                    planned.append((name, a, "link"))
                elif a.is_dir:
                    sub = int(a.target)
                    stack.append([sub, list(self._iter_raw(txn, sub)), 0, [], False])
                    descended = True
                    break
                else:
                    planned.append((name, a, "share"))
                frame[2] += 1
            if descended:
                continue
            child = self._copy_planned(txn, frame[0], planned, remap, names) \
                if frame[4] else None
            stack.pop()
            if not stack:
                return child
            returning = True

    def _copy_planned(self, txn: lmdb.Transaction, dir_id: int,
                      planned: list[tuple[bytes, Attrs, str]], remap: dict[int, int],
                      names: dict[int, list[tuple[int, bytes]]]) -> int:
        """A new directory for `dir_id` holding its planned entries; its id."""
        new_id = self._store.next_id(txn, "dir")
        self._put_header(txn, new_id, DirHeader(1, self.header(txn, dir_id).nsubdirs))
        for name, a, how in planned:
            if how == "share":
                self._ref_target(txn, a)
            elif how == "link":
                if a.link not in remap:
                    fresh = self._store.next_id(txn, "link")
                    self._put_link(txn, fresh, Link(0, self.get_link(txn, a.link).attrs))
                    remap[a.link] = fresh
                    names[fresh] = []
                a = dataclasses.replace(a, link=remap[a.link])
                names[a.link].append((new_id, name))
            txn.put(entry_key(new_id, name), encode_attrs(a), db=self._entries)
        return new_id

    def swap_root_into(self, txn: lmdb.Transaction, root: str, dst_dir: int,
                       name: bytes) -> None:
        """Make a staging tree the entry `name` of `dst_dir` (replacing it), in one step."""
        staged = self.root(txn, root)
        if txn.get(entry_key(dst_dir, name), db=self._entries) is not None:
            self.remove_tree(txn, dst_dir, name)
        txn.delete(root.encode(), db=self._store.db["meta"])
        self.attach(txn, dst_dir, name, staged)

    def raw_entry(self, txn: lmdb.Transaction, dir_id: int, name: bytes) -> Attrs | None:
        """The entry as stored (for a hard link: the reference, not the shared attributes)."""
        return self._get_raw(txn, dir_id, name)

    def hard_link(self, txn: lmdb.Transaction, src_dir: int, src_name: bytes,
                  dst_dir: int, dst_name: bytes) -> Attrs:
        """Give a regular file (or symlink) another name; its attributes become shared."""
        check_name(dst_name)
        raw = self._get_raw(txn, src_dir, src_name)
        if raw is None:
            raise NotFoundError(f"{src_name.decode(errors='replace')}: no such file")
        if raw.is_dir:
            raise InvalidOperationError("hard links to directories are not allowed")
        if txn.get(entry_key(dst_dir, dst_name), db=self._entries) is not None:
            raise ExistsError(f"{dst_name.decode(errors='replace')}: already exists")
        if not raw.link:
            link_id = self._store.next_id(txn, "link")
            self._put_link(txn, link_id, Link(1, raw))
            ref = dataclasses.replace(raw, link=link_id, xattrs={})
            txn.put(entry_key(src_dir, src_name), encode_attrs(ref), db=self._entries)
            raw = ref
        self._ref_target(txn, raw)
        txn.put(entry_key(dst_dir, dst_name), encode_attrs(raw), db=self._entries)
        return self._linked_attrs(txn, raw.link)

    def set_link_attrs(self, txn: lmdb.Transaction, link_id: int,
                       change: Callable[[Attrs], Attrs]) -> Attrs:
        """Change a hard-linked file's shared attributes."""
        link = self.get_link(txn, link_id)
        new = change(link.attrs)
        self._put_link(txn, link_id, dataclasses.replace(link, attrs=new))
        return dataclasses.replace(new, link=link_id)

    def add_link_name(self, txn: lmdb.Transaction, link_id: int, dst_dir: int,
                      dst_name: bytes) -> Attrs:
        """One more name for an already hard-linked file."""
        check_name(dst_name)
        if txn.get(entry_key(dst_dir, dst_name), db=self._entries) is not None:
            raise ExistsError(f"{dst_name.decode(errors='replace')}: already exists")
        link = self.get_link(txn, link_id)
        ref = dataclasses.replace(link.attrs, link=link_id, xattrs={})
        self._ref_target(txn, ref)
        txn.put(entry_key(dst_dir, dst_name), encode_attrs(ref), db=self._entries)
        return dataclasses.replace(link.attrs, link=link_id)

    def is_ancestor(self, txn: lmdb.Transaction, path: Path_, other: Path_) -> bool:
        """Whether `path` is `other` or one of its ancestors (a move into itself)."""
        return len(path) <= len(other) and list(other[: len(path)]) == list(path)

    def iter_versions(self, txn: lmdb.Transaction) -> Iterator[int]:
        """Every version id an entry or link refers to (reachability for gc and fsck)."""
        with txn.cursor(db=self._entries) as cur:
            for _key, raw in cur:
                a = decode_attrs(raw, "entry")
                if a.is_reg and not a.link:
                    yield int(a.target)
        with txn.cursor(db=self._links) as cur:
            for key, raw in cur:
                link = decode_link(int.from_bytes(key, "big"), raw)
                if link.attrs.is_reg:
                    yield int(link.attrs.target)


def new_file_attrs(mode: int, uid: int, gid: int) -> Attrs:
    """Attributes of a new, empty entry of the given type."""
    t = now_ns()
    return Attrs(mode, uid, gid, 0, t, t, t, EMPTY_VERSION if stat.S_ISREG(mode) else 0)


def _show(path: Path_) -> str:
    return "/" + "/".join(p.decode(errors="replace") for p in path)
