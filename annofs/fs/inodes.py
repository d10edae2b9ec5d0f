"""Kernel inode numbers for namespace locations, allocated lazily at lookup.

A location is (parent inode, name); a hard-linked file has one inode for all its names,
keyed by its link id. Numbers are handed out when the kernel first looks a name up, so a
copied tree costs nothing until it is visited, and dropped when the kernel forgets them:
a name looked up again after that gets a new number.

A hard-linked file's number is derived from its (persistent, never reused) link id, so
it stays the same when the kernel forgets the inode between two of its names: tar,
cp -a and rsync -H recognise hard links by (st_dev, st_ino) over a long walk, under
memory pressure too.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import pyfuse3

from annofs.store.records import Attrs

ROOT = pyfuse3.ROOT_INODE
# Hard-linked files: LINK_INO_BASE + link id, far above any counter-assigned number.
LINK_INO_BASE = 1 << 48
# Complete names memos kept at once (`NameMemo`); a directory move looks at each. Past
# this, the oldest goes (its inode's next open builds it again).
MAX_MEMOS = 256

# What a name is judged as (`NameMemo.key`): names with equal keys get one verdict.
NameKey = Callable[[Sequence[bytes]], Hashable]


@dataclass(eq=False)
class NameMemo:
    """The distinct ways a many-named inode's names are judged, each with one name.

    A file may have any number of hard links, and every judged open must judge it under
    each name the kernel knows (the strictest verdict holds): with a name per rule the
    verdict is the same (it depends on the rule and the content only, `key`), so an
    open judges a handful of names, not thousands. Built a chunk of names at a time
    (`InodeTable.scan_step`); valid while the inode's own names are unchanged
    (`Inode.names` equals `names`; a name added joins it), no
    directory on the way to any of them has moved (`visited`: a move makes it `stale`)
    and the policy is `token`.
    """

    token: object
    key: NameKey
    names: int
    # (key, mover) -> a name: mover None for a name the kernel knows, else the uid that
    # moved a directory above it out of there (`Inode.left`; not judged for that uid).
    classes: dict[tuple[Hashable, int | None], list[bytes]] = field(default_factory=dict)
    # Every directory inode on the way from the root to any name walked.
    visited: set[int] = field(default_factory=set)
    stale: bool = False
    # While it is built: the locations still to walk, and the paths of directories seen.
    todo: list[tuple[int, bytes]] = field(default_factory=list)
    dirs: dict[int, tuple[bytes, ...] | None] = field(default_factory=dict)
    complete: bool = False


@dataclass
class Inode:
    """What the daemon knows of one kernel inode."""

    ino: int
    parent: int
    name: bytes
    link: int = 0
    is_dir: bool = False
    # A FIFO: the kernel serves its open and reads itself (see Invalidator.everything).
    is_fifo: bool = False
    lookups: int = 0
    opens: int = 0
    # Set once the last name is gone while the file is still open: its attributes live here.
    orphan: Attrs | None = None
    dir_id: int | None = None
    dir_epoch: int = -1
    # The namespace's cow_epoch when the path to this directory was last made exclusive
    # (Namespace.writable_dir): unchanged since, no directory was shared or copied, so it
    # still is, and a change needs no walk from the root (operations._writable_dir).
    writable_epoch: int = -1
    extra: dict = field(default_factory=dict)
    # Every (parent, name) bound to this inode: one, or several for a hard link.
    locations: set[tuple[int, bytes]] = field(default_factory=set)
    # Names under a rule that needs signers this inode was moved out of (to another
    # rule), each with the mover's uid: a process of another uid may have resolved its
    # path to this inode just before the move, and its OPEN (which carries no name)
    # comes after. Kept while the kernel holds the inode (`InodeTable.former_paths`).
    left: list[tuple[tuple[bytes, ...], int]] = field(default_factory=list)
    # Counts changes to `locations` (a NameMemo is valid for one count).
    names: int = 0
    memo: NameMemo | None = None


class InodeTable:
    """ino <-> location maps, lookup counts, and each directory inode's cached node id."""

    def __init__(self) -> None:
        self._next = ROOT + 1
        self.by_ino: dict[int, Inode] = {ROOT: Inode(ROOT, ROOT, b"", is_dir=True, lookups=1)}
        self._by_loc: dict[tuple[int, bytes], int] = {}
        self._by_link: dict[int, int] = {}
        # Set once any inode has a guarded name it left (`Inode.left`): until then an
        # open need not walk up for them.
        self.any_left = False
        # The complete NameMemos, by inode, oldest first (at most MAX_MEMOS), and those
        # being built (one per inode an open or readlink is building one for: bounded by
        # the requests in flight, and never pushed out by others' memos).
        self._memos: dict[int, NameMemo] = {}
        self._building: dict[int, NameMemo] = {}

    def __len__(self) -> int:
        return len(self.by_ino)

    def get(self, ino: int) -> Inode | None:
        """The inode, if the kernel knows it."""
        return self.by_ino.get(ino)

    def at(self, parent: int, name: bytes) -> Inode | None:
        """The inode already assigned to a location, if any."""
        ino = self._by_loc.get((parent, name))
        return self.by_ino[ino] if ino is not None else None

    def ensure(self, parent: int, name: bytes, a: Attrs, link: int) -> Inode:
        """The inode for a location (a hard link's shared one), assigning a number if new."""
        loc = (parent, name)
        ino = self._by_link.get(link) if link else self._by_loc.get(loc)
        if ino is not None:
            node = self.by_ino[ino]
            self._bind(loc, node)
            return node
        fifo = stat.S_ISFIFO(a.mode)
        if link and LINK_INO_BASE + link not in self.by_ino:
            node = Inode(LINK_INO_BASE + link, parent, name, link=link, is_dir=a.is_dir,
                         is_fifo=fifo)
        else:
            node = Inode(self._next, parent, name, link=link, is_dir=a.is_dir, is_fifo=fifo)
            self._next += 1
        self.by_ino[node.ino] = node
        self._bind(loc, node)
        if link:
            self._by_link[link] = node.ino
        return node

    def _bind(self, loc: tuple[int, bytes], node: Inode) -> None:
        """Make `loc` name `node`, taking it from whatever inode it named before."""
        old = self._by_loc.get(loc)
        if old is not None and old != node.ino and old in self.by_ino:
            self._unbind_from(self.by_ino[old], loc)
        self._by_loc[loc] = node.ino
        if loc not in node.locations:
            node.locations.add(loc)
            self._names_changed(node, added=loc)

    def _unbind_from(self, node: Inode, loc: tuple[int, bytes]) -> None:
        node.locations.discard(loc)
        self._names_changed(node)
        if (node.parent, node.name) == loc and node.locations:
            # A hard link lost the name it was recorded under: any other name will do
            # whose directory the kernel still holds (else no path to it is known, and
            # the lost name stays: judged under it is the safe side).
            known = [other for other in node.locations if other[0] in self.by_ino]
            if known:
                node.parent, node.name = min(known)

    def move(self, node: Inode, old_parent: int, old_name: bytes,
             parent: int, name: bytes) -> None:
        """A rename of (old_parent, old_name): the inode keeps its number at the new
        location. For a hard link only the renamed name moves; its other names stay."""
        old = (old_parent, old_name)
        if self._by_loc.get(old) == node.ino:
            del self._by_loc[old]
        node.locations.discard(old)
        self._names_changed(node)
        if (node.parent, node.name) == old or not node.locations:
            node.parent, node.name = parent, name
        self._bind((parent, name), node)
        if node.is_dir:
            # Every name below has another path now: the memos that walked through it
            # are stale (and an inode's memo in the making starts over).
            for memos in (self._memos, self._building):
                stale = [ino for ino, memo in memos.items() if node.ino in memo.visited]
                for ino in stale:
                    memos.pop(ino).stale = True

    def unbind(self, parent: int, name: bytes) -> Inode | None:
        """A name went away; returns the inode it named (still alive while looked up or open)."""
        ino = self._by_loc.pop((parent, name), None)
        node = self.by_ino.get(ino) if ino is not None else None
        if node is not None:
            self._unbind_from(node, (parent, name))
        return node

    def became_link(self, node: Inode, link: int) -> None:
        """A file got a second name: its inode is now keyed by the link id."""
        node.link = link
        self._by_link[link] = node.ino

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped `n` references; unused inodes leave the table."""
        node = self.by_ino.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= n
        self.maybe_drop(node)

    def maybe_drop(self, node: Inode) -> None:
        """Drop an inode nobody holds (no kernel reference, no open handle)."""
        if node.lookups > 0 or node.opens > 0 or node.ino == ROOT:
            return
        del self.by_ino[node.ino]
        self._drop_memo(node)
        for loc in node.locations | {(node.parent, node.name)}:
            if self._by_loc.get(loc) == node.ino:
                del self._by_loc[loc]
        node.locations.clear()
        if node.link and self._by_link.get(node.link) == node.ino:
            del self._by_link[node.link]

    def path(self, node: Inode) -> list[bytes]:
        """The names from the root to this inode."""
        parts = []
        while node.ino != ROOT:
            parts.append(node.name)
            node = self.by_ino[node.parent]
        parts.reverse()
        return parts

    def paths(self, node: Inode) -> list[list[bytes]]:
        """Every name of the inode the kernel has looked up (several for a hard link),
        its primary name first."""
        out = [self.path(node)]
        if len(node.locations) <= 1:
            return out  # one name: the primary one (most files; every open asks)
        for parent, name in sorted(node.locations):
            holder = self.by_ino.get(parent)
            if (parent, name) != (node.parent, node.name) and holder is not None:
                out.append([*self.path(holder), name])
        return out

    def judged_paths(self, node: Inode, uid: int) -> list[list[bytes]]:
        """The names an open or a readlink by `uid` is judged under: every name the
        kernel knows, and the guarded ones left by others' moves (`former_paths`)."""
        return [*self.paths(node), *self.former_paths(node, uid)]

    def former_paths(self, node: Inode, uid: int) -> list[list[bytes]]:
        """Where `node` would be under each guarded name it, or a directory above any of
        its names, was moved out of by a uid other than `uid` (`Inode.left`): an open by
        `uid` may have been resolved there before the move. (A process of the mover's own
        uid is the mover's to fool.) Every name of a hard-linked file is walked up: the
        directory moved out may be above any of them."""
        if not self.any_left:
            return []
        out = [list(path) for path, mover in node.left if mover != uid]
        starts = node.locations or ({(node.parent, node.name)} if node.ino != ROOT else set())
        for parent_ino, name in sorted(starts):
            below = [name]  # names from `node` up to the current ancestor, reversed
            holder = self.by_ino.get(parent_ino)
            while holder is not None:  # (a directory the kernel forgot: no path above)
                for path, mover in holder.left:
                    if mover != uid:
                        out.append([*path, *reversed(below)])
                if holder.ino == ROOT:
                    break
                below.append(holder.name)
                holder = self.by_ino.get(holder.parent)
        return out

    # -- the names memo (NameMemo) --------------------------------------------------------

    def memo_for(self, node: Inode, token: object, key: NameKey) -> NameMemo:
        """`node`'s names memo for policy `token`: the one it has if still valid
        (complete, or being built by another open: build it along), else a new one to
        build with `scan_step`."""
        memo = node.memo
        if memo is not None and not memo.stale and memo.token is token and \
                memo.names == node.names:
            return memo
        self._drop_memo(node)
        memo = NameMemo(token, key, node.names, todo=sorted(node.locations))
        node.memo = memo
        self._building[node.ino] = memo
        return memo

    @staticmethod
    def memo_valid(node: Inode, memo: NameMemo, token: object) -> bool:
        """Whether `memo` is complete and holds for `node`'s names now, under `token`."""
        return memo.complete and not memo.stale and node.memo is memo and \
            memo.token is token and memo.names == node.names

    def scan_step(self, node: Inode, memo: NameMemo, chunk: int) -> bool:
        """Walk about `chunk` more of `node`'s names (or directories above them, each
        counted as a name) into `memo`; whether it is done
        (complete, or stale: then ask `memo_for` again). Each step is short, so other
        requests are answered between steps (each name costs a walk to the root, the
        first time through a directory)."""
        if memo.stale or memo.names != node.names or node.memo is not memo:
            memo.stale = True
            return True
        if memo.complete:
            return True  # (built by another open meanwhile)
        work = 0  # names walked, and directories walked up through (a name's walk is
        while memo.todo and work < chunk:  # as long as its depth: trees may be deep)
            work += self._classify(memo, memo.todo.pop())
        if memo.todo:
            return False
        memo.complete = True
        memo.dirs = {}  # only needed while building
        del self._building[node.ino]
        if len(self._memos) >= MAX_MEMOS:
            oldest = next(iter(self._memos))
            self._memos.pop(oldest).stale = True
        self._memos[node.ino] = memo
        return True

    def memo_paths(self, node: Inode, memo: NameMemo, uid: int) -> list[list[bytes]]:
        """`judged_paths` from a complete, valid memo: the primary name first, then one
        name per way of judging (those left by `uid`'s own moves not counted)."""
        out = [self.path(node)]
        out.extend(path for (_key, mover), path in memo.classes.items()
                   if mover is None or mover != uid)
        out.extend(list(path) for path, mover in node.left if mover != uid)
        return out

    def _classify(self, memo: NameMemo, loc: tuple[int, bytes]) -> int:
        """Add one location's name (and the names it had where directories above it
        were moved out of: `former_paths`) to `memo`; what it cost (1, and each
        directory walked up through)."""
        parent, name = loc
        holder, walked = self._dir_path(parent, memo)
        if holder is None:
            return 1 + walked  # a directory the kernel forgot: no path to it (as `paths`)
        path = [*holder, name]
        memo.classes.setdefault((memo.key(path), None), path)
        if not self.any_left:
            return 1 + walked
        below = [name]
        d = self.by_ino.get(parent)
        while d is not None:
            for left, mover in d.left:
                former = [*left, *reversed(below)]
                memo.classes.setdefault((memo.key(former), mover), former)
            if d.ino == ROOT:
                break
            below.append(d.name)
            d = self.by_ino.get(d.parent)
        return 1 + walked + len(path)

    def _dir_path(self, ino: int, memo: NameMemo) -> tuple[tuple[bytes, ...] | None, int]:
        """The path of directory `ino` (None if the kernel forgot one on the way), each
        directory on the way recorded in `memo.visited`, and how many were walked up
        through. Only the paths of directories that hold names are kept (`memo.dirs`):
        one per directory on the way cost a tree's depth squared in one step (0.4 s at
        5,000 levels, on the event loop)."""
        names: list[bytes] = []
        cur = ino
        while True:
            if cur in memo.dirs:
                base = memo.dirs[cur]
                break
            d = self.by_ino.get(cur)
            if d is None:
                base = None
                break
            memo.visited.add(cur)
            if cur == ROOT:
                base = ()
                break
            names.append(d.name)
            cur = d.parent
        path = None if base is None else (*base, *reversed(names))
        memo.dirs[ino] = path
        return path, len(names)

    def _names_changed(self, node: Inode, added: tuple[int, bytes] | None = None) -> None:
        """`node`'s names changed: its memo no longer holds, unless the change is one
        name added, which then joins it: walked at once into a complete memo (a walk
        over a tree of the file's names looks each up in turn: one walk to the root
        each, not all), or at a later step into one being built (anyone who may read
        the directories can look names up: each made a build stale, and 4 made the
        open EBUSY)."""
        memo = node.memo
        valid = memo is not None and not memo.stale and memo.names == node.names
        node.names += 1
        if memo is not None and valid and added is not None:
            if memo.complete:
                self._classify(memo, added)
                memo.dirs = {}
            else:
                memo.todo.append(added)
            memo.names = node.names

    def _drop_memo(self, node: Inode) -> None:
        memo = node.memo
        if memo is not None:
            memo.stale = True
            for memos in (self._memos, self._building):
                if memos.get(node.ino) is memo:
                    del memos[node.ino]
            node.memo = None

    def is_within(self, node: Inode, ancestor: Inode) -> bool:
        """Whether `node` is `ancestor` or below it."""
        while True:
            if node.ino == ancestor.ino:
                return True
            if node.ino == ROOT:
                return False
            node = self.by_ino[node.parent]
