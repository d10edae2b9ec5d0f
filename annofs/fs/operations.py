"""The FUSE operations, in the kernel's order: a table of contents of the interface.

Each call is short: it finds the inode's location, asks the namespace or content layer,
and answers. Every change is one LMDB write transaction, so a failed call changes
nothing. Handlers run on the trio loop; only large re-chunking goes to a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import lmdb
import pyfuse3
import trio

from annofs.content.fragments import REPLY_CHECK
from annofs.content.holes import SEEK_DATA, SEEK_HOLE, HoleMap, seek_data_hole
from annofs.content.overlay import DirtyOverlay
from annofs.content.versions import EMPTY_VERSION, MAX_FILE_SIZE, stored_hashes
from annofs.errors import (
    CorruptionError,
    ExistsError,
    InvalidOperationError,
    IsADirectoryError_,
    NotADirectoryError_,
    NotEmptyError,
    NotFoundError,
)
from annofs.explain.throttle import PerCaller, Recent, limited_text
from annofs.fs.dirpos import DirOffsets
from annofs.fs.enforce import NAMES_INLINE, OpenGuard
from annofs.fs.errno_map import fuse_handler
from annofs.fs.gcgate import GcGate
from annofs.fs.inodes import ROOT, Inode, InodeTable
from annofs.fs.openfile import SPILL_BYTES, OpenFile, fold, folds_inline
from annofs.namespace.tree import MAX_NAME, check_name, new_file_attrs, now_ns
from annofs.printable import one_line
from annofs.store.advice import random_access
from annofs.store.packs import NotCached
from annofs.store.records import Attrs, Version
from annofs.trust.admission import Claim
from annofs.trust.nixstore import Caller
from annofs.trust.pathglob import path_text
from annofs.trust.symlink import judge_symlink
from annofs.volume import Volume

log = logging.getLogger("annofs.fs")

# The kernel may cache names and attributes this long. Every change made through the
# mount updates the kernel's caches itself; changes from outside (annofs commands talking
# to the daemon) are pushed with invalidate_entry/invalidate_inode.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0
# FileInfo.noflush exists in annofs's build of pyfuse3 (scripts/pyfuse3-noflush.patch).
NOFLUSH = bool(getattr(pyfuse3, "ANNOFS_NOFLUSH", False))
# Entries looked at for a FIFO in a directory moved under a stricter rule.
FIFO_WALK = 10_000
# A many-named file's names memo (InodeTable.memo_for) is built this many names per
# step, other requests answered between steps (about a millisecond each); one that goes
# stale (a directory above a name moved, a name came or went) is begun again, at most
# this many times: then EBUSY.
NAME_SCAN_CHUNK = 256
NAME_SCAN_TRIES = 4
# Reported as st_blksize: tools size their I/O buffers from it (cp uses max(it, 128 KiB)).
BLOCK_SIZE = 128 * 1024

# Reads are served here, on the loop, big ones too: a hand-off to worker threads (two,
# so hashing could run beside the loop's replies) cost more than it gave on 2 CPUs, where
# the reader's own copies take one: cold 1 GiB through the mount, daemon CPU ~1.5 s ->
# ~1.1 s per GiB (futex wake-ups, the GIL passed back and forth around every fragment's
# hash), 517-595 -> 459-845 MB/s in interleaved runs (2026-12-06, load 2.7).
# lseek(SEEK_DATA/SEEK_HOLE) over more fragments and overlay parts than this runs in a
# worker thread (at most SEEK_THREADS at once).
SEEK_INLINE_PARTS = 4096
SEEK_THREADS = 2
# pyfuse3 as scripts/pyfuse3-patched.sh builds it takes a read's data as a list of
# buffers and sends them with one writev (at most this many; more are joined first).
READ_PARTS = bool(getattr(pyfuse3, "annofs_read_parts", False))
# Reads of packs not in the page cache run in worker threads, this many at once: the
# kernel's readahead sends several READs of a file together, and their disk reads and
# hashing overlap.
DISK_READ_THREADS = 4
MAX_REPLY_PARTS = 1000
# Files up to this size are put in the kernel's page cache at their first open (see
# Operations._push_content): most files of a source tree; bigger ones read as usual.
PUSH_BYTES = 128 * 1024

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_FALLOC_KNOWN = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE

XATTR_PREFIX = b"user."
ANNOFS_XATTRS = b"user.annofs."
MAX_XATTR_VALUE = 64 * 1024
# A file's xattrs, names and values together (ext4 bounds them to a block or so): they
# live in its attributes record, which every lookup, getattr and readdir decodes and
# every setxattr rewrites on the event loop, so its size must not be any user's choice.
MAX_XATTR_TOTAL = 1 << 20


def _seek(base: Version, overlay: DirtyOverlay, offset: int, whence: int) -> int:
    """SEEK_DATA / SEEK_HOLE of `base` + `overlay` (for a worker thread)."""
    return seek_data_hole(HoleMap(base, overlay), offset, whence)


@dataclass
class Handle:
    """An open file or directory handle."""

    node: Inode
    # readdir: the directory's offsets, shared with its other handles (fs/dirpos.py).
    offsets: DirOffsets | None = None
    # The version a read-only handle serves: the one the policy judged at open.
    pinned: Version | None = None
    # Its slots in the inode's handle rules (writer, judged read-write, pinned, cached).
    claim: Claim = field(default_factory=Claim)


class Operations(pyfuse3.Operations):
    """annofs as a FUSE filesystem."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vol: Volume, guard: OpenGuard | None = None) -> None:
        super().__init__()
        self.vol = vol
        self.guard = guard or OpenGuard(None)
        self.ns = vol.namespace
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self.dir_offsets: dict[int, DirOffsets] = {}  # by directory inode, while open
        self.open_files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self.dirty_since_sync = False
        self._seek_threads = trio.CapacityLimiter(SEEK_THREADS)
        self._disk_readers = trio.CapacityLimiter(DISK_READ_THREADS)
        # Versions READs waiting for a disk thread serve: gc keeps them (held_versions),
        # though a commit meanwhile may have left no handle serving them.
        self._disk_reads_of: Counter[int] = Counter()
        # Content writers (folds, commits, restores) hold it shared, gc exclusively.
        self.gc_gate = GcGate()
        # Set when FUSE_INIT is answered: the kernel then applies what we replied and
        # settings may be tuned past it (see annofs.daemon.readahead).
        self.init_done = trio.Event()
        # Work counters, readable as the root's user.annofs.stats (JSON): what a commit
        # cost is observable without timing it.
        self.stats: Counter[str] = Counter()
        # user.annofs.why: a token bucket per uid, run in the uid's own threads; what an
        # explanation shows depends on the caller (the owner of the mount sees all).
        self.why_limit = PerCaller()
        self.why_recent = Recent()
        self.owner_uid = os.getuid()
        # Reads of at least this many bytes go to pyfuse3 unchecked, as a checked reply
        # (`use_checked_replies`); None: every read is checked here.
        self.checked_reply_bytes: int | None = None

    def init(self) -> None:
        """pyfuse3 calls this while answering FUSE_INIT; the reply follows at once."""
        self.init_done.set()

    def use_checked_replies(self, min_bytes: int) -> bool:
        """Hand reads of at least `min_bytes` to pyfuse3 as checked replies: their
        fragments are hashed by pyfuse3's replier thread before it writes a byte, while
        this loop goes on to the next request (inline, without the GIL, where there is no
        thread, its queue is full, or the fragments exceed the reply by much). The check
        was half the loop's time of a 1 MiB read (361 of 540 us). False where this
        pyfuse3 cannot (scripts/pyfuse3-checked-replies.patch not applied)."""
        set_checker = getattr(pyfuse3, "annofs_set_reply_checker", None)
        if set_checker is None or not READ_PARTS:
            return False
        set_checker(REPLY_CHECK, self._reply_mismatch)
        self.checked_reply_bytes = min_bytes
        return True

    def _reply_mismatch(self, h: bytes) -> None:
        """A checked reply's fragment did not match its hash: the reader gets EIO. Called
        by pyfuse3 before that EIO is sent, from its replier thread (holding the GIL) or
        from this loop (a reply checked inline): it may only log."""
        log.error("read: fragment %s: content does not match its hash", h.hex())

    # -- locating ---------------------------------------------------------------------

    def _node(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _attrs(self, txn: lmdb.Transaction, node: Inode) -> Attrs:
        """The stored attributes of an inode (an orphan's are kept in memory)."""
        if node.orphan is not None:
            return node.orphan
        if node.ino == ROOT:
            return self.ns.root(txn)
        if node.link:
            return self.ns.get_link(txn, node.link).attrs
        a = self.ns.get(txn, self._dir_id(txn, self._node(node.parent)), node.name)
        if a is None:
            raise NotFoundError(f"{node.name!r}: gone")
        return a

    def _dir_id(self, txn: lmdb.Transaction, node: Inode) -> int:
        """A directory inode's node id, cached until a shared directory is copied."""
        if node.dir_id is not None and node.dir_epoch == self.ns.cow_epoch:
            return node.dir_id
        # Resolve downwards from the nearest ancestor whose id is still valid, one level
        # at a time: after a copy invalidated every id, a tree thousands of levels deep
        # must not recurse once per level (RecursionError, EIO).
        chain = [node]
        up = node
        while up.ino != ROOT and up.orphan is None and not up.link:
            up = self._node(up.parent)
            if up.dir_id is not None and up.dir_epoch == self.ns.cow_epoch:
                break
            chain.append(up)
        for n in reversed(chain):
            a = self._attrs(txn, n)
            if not a.is_dir:
                raise NotADirectoryError_(f"{n.name!r}: not a directory")
            n.dir_id, n.dir_epoch = int(a.target), self.ns.cow_epoch
        assert node.dir_id is not None
        return node.dir_id

    def _writable_dir(self, txn: lmdb.Transaction, node: Inode) -> int:
        """The directory's node id, made exclusive (copy-on-write) for a change."""
        if node.orphan is not None:
            raise NotFoundError("the directory was removed")
        self.dirty_since_sync = True
        epoch = self.ns.cow_epoch
        if node.writable_epoch == epoch and node.dir_epoch == epoch and \
                node.dir_id is not None and self.ns.is_exclusive(txn, node.dir_id):
            # Made exclusive before, and nothing was shared or copied since: every create,
            # close and chmod of a cp -a would otherwise walk the path from the root.
            return node.dir_id
        dir_id = self.ns.writable_dir(txn, self.inodes.path(node))
        node.dir_id, node.dir_epoch = dir_id, self.ns.cow_epoch
        node.writable_epoch = self.ns.cow_epoch
        return dir_id

    def _change(self, txn: lmdb.Transaction, node: Inode,
                change: Callable[[Attrs], Attrs]) -> Attrs:
        """Change an inode's stored attributes through the right record."""
        self.dirty_since_sync = True
        if node.orphan is not None:
            node.orphan = change(node.orphan)
            return node.orphan
        if node.ino == ROOT:
            self.ns.writable_dir(txn, [])
            return self.ns.set_root_attrs(txn, change)
        if node.link:
            return self.ns.set_link_attrs(txn, node.link, change)
        dir_id = self._writable_dir(txn, self._node(node.parent))
        return self.ns.set_attrs(txn, dir_id, node.name, change)

    def _touch_dir(self, txn: lmdb.Transaction, node: Inode) -> None:
        """A directory's entries changed: its mtime and ctime say so."""
        t = now_ns()
        self._change(txn, node, lambda a: dataclasses.replace(a, mtime_ns=t, ctime_ns=t))

    def _entry(self, txn: lmdb.Transaction, node: Inode, a: Attrs) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = 0
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = a.mode
        if node.orphan is not None:
            e.st_nlink = 0
        elif node.link:
            # A hard link's shared attributes do not carry the link id: ask the record.
            e.st_nlink = self.ns.get_link(txn, node.link).nlink
        else:
            e.st_nlink = self.ns.nlink(txn, a)
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = int(a.target) if stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode) else 0
        size = a.size
        mtime = a.mtime_ns
        of = self.open_files.get(node.ino)
        stored = size
        if of is not None:
            size = of.size
            # Holes are not data (du, cp --sparse=auto, tar -S read st_blocks): the
            # base's data and the written bytes, at most the size.
            stored = min(size, of.base.stored_size + of.overlay.nbytes)
            if of.mtime_ns is not None:  # 0, the epoch, is a time like any other
                mtime = of.mtime_ns
        elif a.is_reg:
            stored = self.vol.versions.stored_size(txn, int(a.target), size)
        e.st_size = 4096 if a.is_dir else size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = ((4096 if a.is_dir else stored) + 511) // 512
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = mtime
        e.st_ctime_ns = a.ctime_ns
        return e

    def _looked_up(self, txn: lmdb.Transaction, parent: Inode, name: bytes,
                   a: Attrs) -> pyfuse3.EntryAttributes:
        """Answer a lookup-like call: the kernel now holds one more reference."""
        link = self.ns.link_id_at(txn, self._dir_id(txn, parent), name)
        node = self.inodes.ensure(parent.ino, name, a, link)
        node.lookups += 1
        return self._entry(txn, node, a)

    # -- lookup, attributes, links --------------------------------------------------------

    @fuse_handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if len(name) > MAX_NAME:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        parent = self._node(parent_inode)
        with self.vol.store.read() as txn:
            a = self.ns.get(txn, self._dir_id(txn, parent), name)
            if a is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if stat.S_ISFIFO(a.mode):
                # Its open and reads would never come here to be judged: not found at
                # all where the policy needs signers (OpenGuard.refuse_fifo).
                self.guard.refuse_fifo([*self.inodes.path(parent), name], ctx.pid, ctx.uid)
            return self._looked_up(txn, parent, name, a)

    @fuse_handler
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)
            if self.inodes.get(ino) is None:
                self.guard.forget_ino(ino)

    @fuse_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        with self.vol.store.read() as txn:
            return self._entry(txn, node, self._attrs(txn, node))

    @fuse_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            if attr.st_size > MAX_FILE_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            via = self.handles.get(fh) if fh is not None else None
            if via is not None and via.claim.writer:
                await self._truncate(node, attr.st_size)  # through a writer's own handle
            else:
                # By path: a writer for as long as it takes (no judged read-write handle
                # may be open beside it, nor opened while it waits for the file's lock).
                claim = self.guard.reserve(node, [self.inodes.path(node)], ctx.pid, ctx.uid,
                                           writer=True, verified_rw=False)
                try:
                    await self._truncate(node, attr.st_size)
                finally:
                    self.guard.release(node, claim)
        t = now_ns()

        def change(a: Attrs) -> Attrs:
            if fields.update_mode:
                a = dataclasses.replace(a, mode=stat.S_IFMT(a.mode) | stat.S_IMODE(attr.st_mode))
            if fields.update_uid:
                a = dataclasses.replace(a, uid=attr.st_uid)
            if fields.update_gid:
                a = dataclasses.replace(a, gid=attr.st_gid)
            if fields.update_atime:
                a = dataclasses.replace(a, atime_ns=attr.st_atime_ns)
            if fields.update_mtime:
                a = dataclasses.replace(a, mtime_ns=attr.st_mtime_ns)
            return dataclasses.replace(a, ctime_ns=t)

        of = self.open_files.get(node.ino)
        if of is not None and fields.update_mtime:
            # An explicit time wins over the time of the last write, also when the
            # written bytes are committed later: cp -a and tar set times with futimens
            # on the still-open descriptor, before the close commits.
            of.mtime_ns = attr.st_mtime_ns if of.dirty else None
        with self.vol.store.write() as txn:
            a = self._change(txn, node, change)
            return self._entry(txn, node, a)

    @fuse_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        with self.vol.store.read() as txn:
            a = self._attrs(txn, node)
        if not a.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        assert isinstance(a.target, bytes)
        if self.guard.active and self.guard.gate is not None:
            # A symlink is content, judged like a file at open (trust/symlink.py). The
            # kernel asks READLINK on every walk through it (no FUSE_CAP_CACHE_SYMLINKS),
            # so a refusal here refuses every path through it too.
            for _ in range(NAME_SCAN_TRIES):
                paths, token = await self._judged_paths(node, ctx, symlink=True)
                judge = functools.partial(judge_symlink, self.guard.gate, paths,
                                          a.target, caller=Caller(ctx.uid, a.uid))
                if self.guard.nix_aware or len(paths) > NAMES_INLINE:
                    # Judging in a Nix store may hash a store path's NAR: off the loop;
                    # so are many names (a symlink's in many directories each judge apart).
                    path, link, verdict = await trio.to_thread.run_sync(
                        judge, limiter=self.guard.hasher(ctx.uid))
                else:
                    path, link, verdict = judge()
                if self._picked_under(token):
                    break
            else:
                raise self.guard.unsettled(self.inodes.path(node), ctx.pid, ctx.uid)
            await self.guard.conclude(path, link, verdict, ctx.pid, ctx.uid)
        return a.target

    # -- directories ----------------------------------------------------------------------

    @fuse_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        with self.vol.store.read() as txn:
            self._dir_id(txn, node)
        fh = self._new_handle(node)
        offsets = self.dir_offsets.get(node.ino)
        if offsets is None:
            offsets = self.dir_offsets[node.ino] = DirOffsets()
        offsets.handles += 1
        self.handles[fh].offsets = offsets
        return fh

    @fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self.handles[fh]
        node = h.node
        assert h.offsets is not None
        if start_id:
            after = h.offsets.name_at(start_id)
            if after is None:
                return  # not an offset of ours: the end
        else:
            h.offsets.rewind()  # from the start
            after = None
        # Entries come in name order from LMDB, resuming after the last name the kernel
        # took: no snapshot, so no name removed since and no attributes from before a
        # change (readdirplus puts both in the kernel's caches). Each name's offset is
        # remembered once per directory (telldir/seekdir may come back to any).
        with self.vol.store.read() as txn:
            for name, a in self.ns.listdir(txn, self._dir_id(txn, node), after):
                child = self.inodes.ensure(node.ino, name, a, a.link)
                off = h.offsets.offset_of(name)
                if not pyfuse3.readdir_reply(token, name, self._entry(txn, child, a), off):
                    self.inodes.maybe_drop(child)
                    break
                child.lookups += 1

    @fuse_handler
    async def releasedir(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None and h.offsets is not None:
            h.offsets.handles -= 1
            if not h.offsets.handles:
                self.dir_offsets.pop(h.node.ino, None)

    @fuse_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.sync()

    @fuse_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._make(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx, 0)

    @fuse_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # FIFOs, sockets (bind() of a Unix socket makes one) and device nodes: a type and
        # a device number; the kernel serves their I/O, never us. Hence no FIFO where the
        # policy needs signers (OpenGuard.fifo_refusal).
        if stat.S_ISFIFO(mode):
            check_name(name)
            self.guard.refuse_fifo([*self.inodes.path(self._node(parent_inode)), name],
                                   ctx.pid, ctx.uid)
        return self._make(parent_inode, name, mode, ctx, rdev)

    @fuse_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target)

    def _make(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
              target: int | bytes) -> pyfuse3.EntryAttributes:
        """Create a new entry of any kind under a directory inode."""
        check_name(name)
        parent = self._node(parent_inode)
        with self.vol.store.write() as txn:
            dir_id = self._writable_dir(txn, parent)
            pa = self._attrs(txn, parent)
            a = new_file_attrs(mode, ctx.uid, ctx.gid)
            if pa.mode & stat.S_ISGID:
                # BSD group semantics under a setgid directory, as ext4 does.
                a = dataclasses.replace(a, gid=pa.gid,
                                        mode=a.mode | (stat.S_ISGID if a.is_dir else 0))
            if not stat.S_ISREG(mode):
                size = len(target) if isinstance(target, bytes) else 0
                a = dataclasses.replace(a, target=target, size=size)
            a = self.ns.create(txn, dir_id, name, a)
            self._touch_dir(txn, parent)
            return self._looked_up(txn, parent, name, a)

    @fuse_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, ctx.uid, want_dir=False)

    @fuse_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, ctx.uid, want_dir=True)

    def _remove(self, parent_inode: int, name: bytes, uid: int, *, want_dir: bool) -> None:
        parent = self._node(parent_inode)
        with self.vol.store.write() as txn:
            dir_id = self._writable_dir(txn, parent)
            link = self.ns.link_id_at(txn, dir_id, name)
            a = self.ns.remove(txn, dir_id, name, want_dir=want_dir)
            remaining = self._link_names(txn, link) if link else 0
            if remaining:
                self._stamp_link(txn, link)
            self._touch_dir(txn, parent)
        removed = [*self.inodes.path(parent), name]
        node = self.inodes.unbind(parent.ino, name)
        if node is not None and remaining == 0:
            self._orphan(node, a)
        elif node is not None:
            # A hard-linked file lost a name, maybe a strict one with its others under
            # another rule: an open resolved through the lost one may come after.
            self._note_move_out(node, removed, self.inodes.path(node), uid)

    def _note_move_out(self, node: Inode, old: list[bytes], new: list[bytes],
                       uid: int) -> None:
        """A name `node` left (`OpenGuard.note_move_out`); once any is kept, opens look
        for them (`InodeTable.former_paths`)."""
        if self.guard.note_move_out(node, old, new, uid):
            self.inodes.any_left = True

    def _stamp_link(self, txn: lmdb.Transaction, link: int) -> None:
        """A hard-linked file lost a name but lives on: its ctime says so (POSIX, ext4)."""
        t = now_ns()
        self.ns.set_link_attrs(txn, link, lambda a: dataclasses.replace(a, ctime_ns=t))

    def _link_names(self, txn: lmdb.Transaction, link: int) -> int:
        """How many names a hard-linked file has left (its record goes with the last)."""
        try:
            return self.ns.get_link(txn, link).nlink
        except NotFoundError:
            return 0

    def _orphan(self, node: Inode, a: Attrs) -> None:
        """The inode's last name is gone; it lives on in memory while held."""
        node.orphan = a
        node.link = 0
        self.inodes.maybe_drop(node)

    @fuse_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        check_name(name_new)
        old_parent = self._node(parent_inode_old)
        new_parent = self._node(parent_inode_new)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        if old_parent.ino == new_parent.ino and name_old == name_new:
            return
        with self.vol.store.write() as txn:
            # Path copying for the second directory never copies a node on the first's
            # path (those are exclusive by now), so both ids stay valid.
            src_dir = self._writable_dir(txn, old_parent)
            dst_dir = self._writable_dir(txn, new_parent)
            src = self.ns.raw_entry(txn, src_dir, name_old)
            if src is None:
                raise NotFoundError(f"{name_old!r}: no such file")
            if src.link:
                self.guard.check_link_move([*self.inodes.path(old_parent), name_old],
                                           [*self.inodes.path(new_parent), name_new])
            dst = self.ns.raw_entry(txn, dst_dir, name_new)
            moving = self.inodes.at(old_parent.ino, name_old)
            replaced = self.inodes.at(new_parent.ino, name_new)
            if src.is_dir:
                self._check_not_into_itself(txn, src, new_parent)
            self._check_no_fifo_moves(txn, src, [*self.inodes.path(old_parent), name_old],
                                      [*self.inodes.path(new_parent), name_new])
            if exchange and dst is not None:
                self._check_no_fifo_moves(txn, dst, [*self.inodes.path(new_parent), name_new],
                                          [*self.inodes.path(old_parent), name_old])
            if exchange:
                if dst is None:
                    raise NotFoundError(f"{name_new!r}: no such file")
                if dst.is_dir:
                    self._check_not_into_itself(txn, dst, old_parent)
                self.ns.detach(txn, src_dir, name_old)
                self.ns.detach(txn, dst_dir, name_new)
                self.ns.attach(txn, dst_dir, name_new, src)
                self.ns.attach(txn, src_dir, name_old, dst)
            else:
                orphaned: Attrs | None = None
                if dst is not None:
                    if noreplace:
                        raise ExistsError(f"{name_new!r}: exists")
                    if src.link and src.link == dst.link:
                        return  # two names of one file: POSIX says do nothing
                    if src.is_dir and not dst.is_dir:
                        raise NotADirectoryError_(f"{name_new!r}: not a directory")
                    if dst.is_dir and not src.is_dir:
                        raise IsADirectoryError_(f"{name_new!r}: is a directory")
                    if dst.is_dir and not self.ns.is_empty(txn, int(dst.target)):
                        raise NotEmptyError(f"{name_new!r}: directory not empty")
                    orphaned = self.ns.get(txn, dst_dir, name_new)
                    still_linked = bool(dst.link) and self.ns.get_link(txn, dst.link).nlink > 1
                    self.ns.remove(txn, dst_dir, name_new)
                    if still_linked:
                        orphaned = None
                        self._stamp_link(txn, dst.link)
                self.ns.detach(txn, src_dir, name_old)
                self.ns.attach(txn, dst_dir, name_new, src)
            # A moved entry's ctime changes (as on ext4). Set it at its new name: the
            # inode table still has the old location until the transaction is done.
            t = now_ns()

            def stamp(a: Attrs) -> Attrs:
                return dataclasses.replace(a, ctime_ns=t)

            self.ns.set_attrs(txn, dst_dir, name_new, stamp)
            if exchange:
                self.ns.set_attrs(txn, src_dir, name_old, stamp)
            self._touch_dir(txn, old_parent)
            if new_parent.ino != old_parent.ino:
                self._touch_dir(txn, new_parent)
        old_path = [*self.inodes.path(old_parent), name_old]
        new_path = [*self.inodes.path(new_parent), name_new]
        if moving is not None:
            self._note_move_out(moving, old_path, new_path, ctx.uid)
        if exchange and replaced is not None:
            self._note_move_out(replaced, new_path, old_path, ctx.uid)
        if exchange:
            if moving is not None:
                self.inodes.move(moving, old_parent.ino, name_old, new_parent.ino, name_new)
            if replaced is not None:
                self.inodes.move(replaced, new_parent.ino, name_new, old_parent.ino, name_old)
            return
        if replaced is not None and replaced is not moving:
            self.inodes.unbind(new_parent.ino, name_new)
            if orphaned is not None:
                self._orphan(replaced, orphaned)
            else:  # a hard-linked file lost a name, maybe a strict one
                self._note_move_out(replaced, new_path, self.inodes.path(replaced), ctx.uid)
        if moving is not None:
            self.inodes.move(moving, old_parent.ino, name_old, new_parent.ino, name_new)

    def _check_not_into_itself(self, txn: lmdb.Transaction, moved: Attrs, dest: Inode) -> None:
        """EINVAL for a move of a directory into its own subtree."""
        node = dest
        while True:
            if node.orphan is None and node.ino != ROOT:
                a = self._attrs(txn, node)
                if a.is_dir and a.target == moved.target:
                    raise InvalidOperationError("cannot move a directory into itself")
            elif node.ino == ROOT and self.ns.root(txn).target == moved.target:
                raise InvalidOperationError("cannot move a directory into itself")
            if node.ino == ROOT:
                return
            node = self._node(node.parent)

    def _check_no_fifo_moves(self, txn: lmdb.Transaction, raw: Attrs, src: list[bytes],
                             dst: list[bytes]) -> None:
        """EXDEV for a FIFO, or a directory holding one, moved from another rule to where
        the policy needs signers (`OpenGuard.fifo_refusal`). EXDEV, as for hard links
        across rules: `mv` falls back to copying, and the copy's mkfifo is refused. A
        directory's own path says nothing of the rules of the names below it (a
        carve-out): each FIFO below is judged where it would land, unless the policy says
        for sure that every name below keeps its rule (`OpenGuard.same_rules_below`). A
        directory too big to look through (FIFO_WALK entries) is EXDEV too: the safe side.
        """
        if raw.is_dir:
            if self.guard.same_rules_below(src, dst) or not self.guard.fifo_refusal_below(dst):
                return
        elif not stat.S_ISFIFO(raw.mode) or self.guard.same_rule(src, dst):
            return
        why = None
        if not raw.is_dir:
            why = self.guard.fifo_refusal(dst)
        else:
            seen = 0
            todo: list[tuple[int, tuple[bytes, ...]]] = [(int(raw.target), ())]
            while todo and why is None:
                dir_id, below = todo.pop()
                for name, a in self.ns.listdir(txn, dir_id):
                    seen += 1
                    if seen > FIFO_WALK:
                        why = f"more than {FIFO_WALK} entries to look through for FIFOs"
                        break
                    if stat.S_ISFIFO(a.mode):
                        here = [*dst, *below, name]
                        if not self.guard.same_rule([*src, *below, name], here):
                            why = self.guard.fifo_refusal(here)
                            if why is not None:
                                break
                    if a.is_dir:
                        todo.append((int(a.target), (*below, name)))
        if why is not None:
            log.info("refused: moving %s to %s", one_line(path_text(src)), one_line(why))
            raise pyfuse3.FUSEError(errno.EXDEV)

    @fuse_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        new_parent = self._node(new_parent_inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EPERM)
        if node.orphan is not None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self._commit(node)
        if node.orphan is not None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # After the await: a rename meanwhile may have moved the file under another rule.
        self.guard.check_link_move(self.inodes.path(node),
                                   [*self.inodes.path(new_parent), new_name])
        with self.vol.store.write() as txn:
            dst_dir = self._writable_dir(txn, new_parent)
            if node.link:
                a = self.ns.add_link_name(txn, node.link, dst_dir, new_name)
            else:
                src_dir = self._writable_dir(txn, self._node(node.parent))
                dst_dir = self._writable_dir(txn, new_parent)
                a = self.ns.hard_link(txn, src_dir, node.name, dst_dir, new_name)
                self.inodes.became_link(node, self.ns.link_id_at(txn, src_dir, node.name))
            t = now_ns()
            a = self._change(txn, node, lambda x: dataclasses.replace(x, ctime_ns=t))
            self._touch_dir(txn, new_parent)
            self.inodes.ensure(new_parent.ino, new_name, a, node.link)
            node.lookups += 1
            return self._entry(txn, node, a)

    # -- extended attributes ----------------------------------------------------------------

    @fuse_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        self._check_xattr_name(name, writing=True)
        if len(value) > MAX_XATTR_VALUE:
            raise pyfuse3.FUSEError(errno.E2BIG)
        node = self._node(inode)
        t = now_ns()

        def change(a: Attrs) -> Attrs:
            xattrs = {**a.xattrs, name: bytes(value)}
            if sum(len(k) + len(v) for k, v in xattrs.items()) > MAX_XATTR_TOTAL:
                raise pyfuse3.FUSEError(errno.ENOSPC)  # as ext4 answers: no room
            return dataclasses.replace(a, xattrs=xattrs, ctime_ns=t)

        with self.vol.store.write() as txn:
            self._change(txn, node, change)

    @fuse_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if name == ANNOFS_XATTRS + b"stats" and node.ino == ROOT:
            stats = dict(self.stats)
            reply_counts = getattr(pyfuse3, "annofs_reply_thread_counts", None)
            if reply_counts is not None:  # scripts/pyfuse3-reply-thread.patch
                (stats["replies_by_thread"], stats["replies_by_thread_refused"],
                 stats["replies_inline_queue_full"],
                 stats["checked_replies_refused"]) = reply_counts()
            return json.dumps(stats, sort_keys=True).encode()
        if name.startswith(ANNOFS_XATTRS):
            return await self._annofs_xattr(node, name, ctx)
        self._check_xattr_name(name, writing=False)
        with self.vol.store.read() as txn:
            value = self._attrs(txn, node).xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        with self.vol.store.read() as txn:
            a = self._attrs(txn, node)
        # The computed user.annofs.* attributes are readable by name but not listed:
        # cp -a and tar --xattrs copy whatever is listed, which would leak them onto host
        # files and fail (EPERM) when such a copy comes back into the mount.
        return list(a.xattrs)

    @fuse_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_xattr_name(name, writing=True)
        node = self._node(inode)
        t = now_ns()
        with self.vol.store.write() as txn:
            if name not in self._attrs(txn, node).xattrs:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            self._change(txn, node, lambda a: dataclasses.replace(
                a, xattrs={k: v for k, v in a.xattrs.items() if k != name}, ctime_ns=t))

    @staticmethod
    def _check_xattr_name(name: bytes, *, writing: bool) -> None:
        # Only the user namespace is stored; security.*, trusted.* and system.* (ACLs) are
        # not supported, which tools such as cp -a and tar treat as "nothing to copy".
        if not name.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if len(name) > MAX_NAME:
            raise pyfuse3.FUSEError(errno.ERANGE)
        if writing and name.startswith(ANNOFS_XATTRS):
            raise pyfuse3.FUSEError(errno.EPERM)  # computed by annofs, never written

    async def _annofs_xattr(self, node: Inode, name: bytes,
                            ctx: pyfuse3.RequestContext) -> bytes:
        """The read-only attributes annofs computes."""
        await self._commit(node)
        with self.vol.store.read() as txn:
            a = self._attrs(txn, node)
            if not a.is_reg:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            v = self.vol.versions.get(txn, int(a.target))
        why_key = None
        if name == ANNOFS_XATTRS + b"why" and self.guard.gate is not None:
            # Bounded per user before the work: explanations cost CPU.
            now = trio.current_time()
            why_key = (ctx.uid, node.ino, v.id, self.guard.gate.policy.generation)
            recent = self.why_recent.get(why_key, now)
            if recent is not None:
                return recent
            wait = self.why_limit.wait(ctx.uid, now)
            if wait:
                self.stats["why_limited"] += 1
                return limited_text(wait)
        if name == ANNOFS_XATTRS + b"version":
            return str(v.id).encode()
        if name == ANNOFS_XATTRS + b"digest":
            v = await trio.to_thread.run_sync(self.vol.versions.ensure_digest, v,
                                              limiter=self.guard.hasher(ctx.uid))
            assert v.digest is not None
            return b"blake3:" + v.digest.hex().encode()
        if name in (ANNOFS_XATTRS + b"status", ANNOFS_XATTRS + b"why"):
            # Readable even when open() is refused: this is how a user learns why.
            gate = self.guard.gate
            if gate is None:
                return b"off: no policy loaded"
            # (may hash a deferred digest: in one of this caller's hashing threads)
            verdict = await trio.to_thread.run_sync(gate.verdict_as, self.inodes.path(node),
                                                    v, Caller(ctx.uid, a.uid),
                                                    limiter=self.guard.hasher(ctx.uid))
            if name == ANNOFS_XATTRS + b"why":
                # The full explanation (original, diff), as this caller may see it: CPU
                # work, off the event loop.
                from annofs.explain.visibility import caller_of, why_xattr
                caller = caller_of(ctx.uid, ctx.gid, ctx.pid, self.owner_uid)
                # In the caller's own few threads: one user's costly explanation (a
                # long walk, a big diff) holds up nobody else's.
                self.stats["why_explained"] += 1
                value = await trio.to_thread.run_sync(
                    why_xattr, gate, self.inodes.path(node), v, verdict, caller,
                    limiter=self.guard.hasher(ctx.uid))
                self.why_recent.put(why_key, value, trio.current_time())
                return value
            signers = ", ".join(verdict.signers) or "none"
            return f"{verdict.status}; signers: {signers}; rule: {verdict.rule}".encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    # -- files --------------------------------------------------------------------------------

    def _new_handle(self, node: Inode) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(node)
        return fh

    def _open_file(self, txn: lmdb.Transaction, node: Inode) -> OpenFile:
        of = self.open_files.get(node.ino)
        if of is None:
            a = self._attrs(txn, node)
            if not a.is_reg:
                raise pyfuse3.FUSEError(errno.EINVAL)
            of = OpenFile.of(self.vol.versions.get(txn, int(a.target)))
            self.open_files[node.ino] = of
        return of

    @fuse_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        access = flags & os.O_ACCMODE
        pinned: Version | None = None
        writer = access != os.O_RDONLY or bool(flags & os.O_TRUNC)  # truncating writes
        active = self.guard.active
        judged = access != os.O_WRONLY and active
        verified_rw = access == os.O_RDWR and active
        # The kernel does not say through which name an open came: a hard-linked file is
        # judged under each name it knows, and the strictest verdict holds. (Hard links do
        # not cross rules, but a directory moved with one inside can take a name of it
        # under a looser rule.)
        # (Without a policy in force nothing asks for them: a deep path costs a walk.)
        # And the names it was moved out of by others, where this open may have been
        # resolved (`OpenGuard.note_move_out`).
        # A file of many names: one per way of judging them (`_judged_paths`).
        paths, token = (await self._judged_paths(node, ctx, symlink=False) if active
                        else ([[]], None))
        if verified_rw and self.guard.nix_aware:
            # A writer's read-write open of a Nix store path in flight is allowed whatever
            # the bytes: it need not be the only writer (Nix's .lock files, opened by
            # every process working on that path at once).
            with self.vol.store.read() as txn:
                owner = self._attrs(txn, node).uid
            verified_rw = not self.guard.content_free(paths, Caller(ctx.uid, owner))
        # The slots first, before anything is awaited: an open that overlaps this one
        # sees it, whatever this one waits for (a commit, hashing, an explanation).
        # (Only a many-named file's names may have been gathered, a chunk at a time:
        # nothing was decided meanwhile, so this open is as one that came later.)
        claim = self.guard.reserve(node, paths, ctx.pid, ctx.uid, writer=writer,
                                   verified_rw=verified_rw,
                                   reader=judged and access == os.O_RDONLY)
        fresh = node.ino not in self.open_files
        opened = False
        try:
            if judged:
                # Judge what is stored: unflushed bytes carry no signature.
                await self._commit(node)
                fresh = node.ino not in self.open_files
                with self.vol.store.read() as txn:
                    # A file not open yet gets its open state here, from the version
                    # judged (read once, not twice); the open below reuses it.
                    version = (self._open_file(txn, node).base if fresh else
                               self.vol.versions.get(txn, int(self._attrs(txn, node).target)))
                    # Who opens, and whose file: a Nix store path in flight is its
                    # writers' (trust/nixstore.py). Asked only where a Nix store is judged.
                    caller = (Caller(ctx.uid, self._attrs(txn, node).uid)
                              if self.guard.nix_aware else None)
                    # Judged in the snapshot the version came from: one transaction.
                    judgement = (self.guard.judge_in(txn, paths, version, caller)
                                 if len(paths) <= NAMES_INLINE else None)
                if judgement is None:  # a deferred digest (hashed off the loop), many names
                    version, judgement = await self.guard.judge(paths, version, ctx.uid,
                                                                caller)
                for _ in range(NAME_SCAN_TRIES):
                    if self._picked_under(token):
                        break
                    paths, token = await self._judged_paths(node, ctx, symlink=False)
                    version, judgement = await self.guard.judge(paths, version, ctx.uid,
                                                                caller)
                else:
                    raise self.guard.unsettled(self.inodes.path(node), ctx.pid, ctx.uid)
                await self.guard.conclude(judgement.path, version, judgement.verdict, ctx.pid,
                                          ctx.uid)
                guarded = judgement.guarded
                # Pinned to the version judged only where that matters: a rule needs
                # signers. Elsewhere the reader reads the file as it is, as without a
                # policy: its short READs of an older version beside an appending
                # writer left zeros in the kernel's shared cache (SECURITY.md, 16).
                if access == os.O_RDONLY and guarded:
                    pinned = version
            else:
                guarded = writer and self.guard.guarded(paths)
            of = self.open_files.get(node.ino)  # made above when judged: no second snapshot
            if of is None:
                with self.vol.store.read() as txn:
                    of = self._open_file(txn, node)
            fh = self._next_fh
            serves = pinned.id if pinned is not None else of.parent_version
            first = self.guard.state(node).cached_version is None
            claim, info = self.guard.admit(fh, node, claim, serves, paths[0], ctx.pid, ctx.uid,
                                           pinned=pinned is not None, judged=judged,
                                           guarded=guarded)
            opened = True
        finally:
            if not opened:
                self.guard.release(node, claim)
                if fresh and node.opens == 0:
                    self.open_files.pop(node.ino, None)  # refused: no handle holds it
        node.opens += 1
        fh = self._new_handle(node)
        h = self.handles[fh]
        h.pinned, h.claim = pinned, claim
        if flags & os.O_TRUNC:
            # libfuse asks for atomic O_TRUNC: the kernel sends no setattr, the open must
            # truncate. It stays in the overlay, so the close makes one version, not two.
            async with of.lock:
                if of.size:
                    of.overlay.truncate(0)
                    of.mtime_ns = now_ns()
            if ctx.uid != 0:
                self._kill_privs(node)
        if NOFLUSH and access == os.O_RDONLY and not flags & os.O_TRUNC:
            # A reader's close has nothing to commit (the node's writers commit at their
            # own FLUSH and RELEASE): no FLUSH round trip for it, one per file `tar` reads.
            info.noflush = True
        if first and access == os.O_RDONLY and not info.direct_io and not flags & os.O_TRUNC:
            self._push_content(node, pinned if pinned is not None else
                               None if of.dirty else of.base, info)
        return info

    async def _judged_paths(self, node: Inode, ctx: pyfuse3.RequestContext, *,
                            symlink: bool) -> tuple[list[list[bytes]], object]:
        """The names an open or a readlink by `ctx.uid` is judged under
        (`InodeTable.judged_paths`), and the policy they were picked for (None: every
        name, good for any). For a file of more than NAMES_INLINE names, one per
        way of judging them, from its names memo (`InodeTable.memo_for`), built a chunk
        at a time between other requests, in the caller's own few turns
        (`OpenGuard.hasher`): a file of 20,000 names cost every open a walk over all of
        them, on the event loop, and anyone can make one. EBUSY, recorded, if its names
        keep changing under the build (none may go unjudged). Judged under another
        policy they may miss a rule (`_picked_under`)."""
        if len(node.locations) <= NAMES_INLINE:
            return self.inodes.judged_paths(node, ctx.uid), None
        for _ in range(NAME_SCAN_TRIES):
            token, key = self.guard.name_key(symlink)
            memo = self.inodes.memo_for(node, token, key)
            if not memo.complete:
                async with self.guard.hasher(ctx.uid):
                    while not self.inodes.scan_step(node, memo, NAME_SCAN_CHUNK):
                        await trio.sleep(0)
            # Checked and used with no await between: what it says is what holds now.
            if self.inodes.memo_valid(node, memo, self.guard.name_key(symlink)[0]):
                self.stats["names_memo_used"] += 1
                return self.inodes.memo_paths(node, memo, ctx.uid), memo.token
        raise self.guard.unsettled(self.inodes.path(node), ctx.pid, ctx.uid)

    def _picked_under(self, token: object) -> bool:
        """Whether names `_judged_paths` picked for policy `token` were judged under it:
        one name per rule of one policy can miss a rule of another (a carve-out of some of
        them). Asked after judging: a reload while an open waits (hashing a digest,
        committing) makes it pick and judge again."""
        return token is None or self.guard.gate is None or self.guard.gate.policy is token

    def _push_content(self, node: Inode, v: Version | None, info: pyfuse3.FileInfo) -> None:
        """Put a small file's content in the kernel's page cache as it is opened.

        Then its reads never come here: that saves the READ round trip, and the GETATTR
        that follows one (the kernel marks atime stale after every FUSE read, so the
        reader's next fstat, such as tar's "changed as we read it" check, asks again):
        5 requests per file become 3 for `tar -c`. Only at an inode's first open (the
        kernel holds no page of it yet) and only verified bytes of the version this handle
        serves, which the kept cache then holds (FileInfo.keep_cache).
        """
        if v is None or not 0 < v.size <= PUSH_BYTES:
            return
        try:
            data = b"".join(self.vol.versions.read_parts_snapshot(v, 0, v.size, nowait=True))
        except NotCached:
            # Not pushed: its reads come here, and wait for the disk in a thread. No await
            # here: another handle's write landing meanwhile would be overwritten in the
            # kernel's cache by these older bytes.
            return
        except CorruptionError:
            # The open stands (undamaged ranges stay readable); reads of the damaged
            # fragment fail with EIO, and say so in the log, as without the push.
            return
        try:
            pyfuse3.notify_store(node.ino, 0, data)
        except OSError as e:
            # Not fatal: reads come here as usual. ENOSYS: the kernel cannot take stores.
            log.debug("notify_store of inode %d: %s", node.ino, e)
            return
        self.stats["pushed_files"] += 1
        info.keep_cache = True

    def _kill_privs(self, node: Inode) -> None:
        """A truncation by a caller without CAP_FSETID drops setuid, and setgid with
        group execute, as the kernel's should_remove_suid does for a truncate it sends
        us: an atomic O_TRUNC open comes here instead. (Root is taken as CAP_FSETID.)"""
        with self.vol.store.read() as txn:
            mode = self._attrs(txn, node).mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            with self.vol.store.write() as txn:
                self._change(txn, node, lambda a: dataclasses.replace(a, mode=a.mode & ~kill))

    @fuse_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        entry = self._make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx,
                           EMPTY_VERSION)
        node = self._node(entry.st_ino)
        with self.vol.store.read() as txn:
            of = self._open_file(txn, node)
        # A new file: nothing to judge, but a writer, which bypasses the page cache where
        # signers are needed (trust.admission).
        path = self.inodes.path(node) if self.guard.active else []
        claim = self.guard.reserve(node, [path], ctx.pid, ctx.uid, writer=True, verified_rw=False)
        claim, info = self.guard.admit(self._next_fh, node, claim, of.parent_version, path,
                                       ctx.pid, ctx.uid, pinned=False, judged=False,
                                       guarded=self.guard.guarded([path]))
        node.opens += 1
        fh = self._new_handle(node)
        self.handles[fh].claim = claim
        return info, entry

    @fuse_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        v = h.pinned
        if v is None:
            of = self.open_files[h.node.ino]
            if of.lock.locked():
                # A write (or a commit) is under way, maybe a WRITE received before this
                # READ and waiting for the lock: come after it (the lock is FIFO). Else
                # this reply would carry the bytes from before that write, and the kernel
                # caches them as up to date under a size that already counts the write
                # (a reader saw zeros at the end of an appended log).
                async with of.lock:
                    pass
            if of.overlay:  # unflushed bytes: read here, where writes change them
                return of.read(self.vol, off, size)
            v = of.base
        if self.checked_reply_bytes is not None and size >= self.checked_reply_bytes:
            unverified = await self._stored(
                functools.partial(self.vol.versions.read_unverified_snapshot,
                                  max_frags=MAX_REPLY_PARTS), v, off, size)
            if unverified is not None:
                return unverified.reply()  # type: ignore[return-value]
        # The parts as read (slices of pack reads), sent with one writev: no joined copy.
        parts = await self._stored(self.vol.versions.read_parts_snapshot, v, off, size)
        if not READ_PARTS:
            return b"".join(parts)
        if len(parts) == 1:
            return parts[0]  # type: ignore[return-value]
        return parts if len(parts) <= MAX_REPLY_PARTS else b"".join(parts)  # type: ignore[return-value]

    async def _stored(self, read: Callable[..., T], v: Version, off: int, size: int) -> T:
        """`read(v, off, size)` of a stored version (`VersionStore.read_parts_snapshot` or
        `read_unverified_snapshot`): here if the page cache holds the bytes, else in a
        worker thread (one of DISK_READ_THREADS), so that no request waits on the event
        loop for the disk (a cold 1 MiB read took every other request's turn for as long
        as the disk took)."""
        try:
            return read(v, off, size, nowait=True)
        except NotCached:
            self.stats["disk_reads"] += 1
        # Held from here (no await before): a gc while this waits for a thread (behind
        # other users' cold reads) would free the fragments it is about to read.
        self._disk_reads_of[v.id] += 1
        try:
            return await trio.to_thread.run_sync(functools.partial(read, v, off, size),
                                                 limiter=self._disk_readers)
        finally:
            self._disk_reads_of[v.id] -= 1
            if not self._disk_reads_of[v.id]:
                del self._disk_reads_of[v.id]

    @fuse_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.handles[fh].node
        of = self.open_files[node.ino]
        if off + len(buf) > MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        async with of.lock:
            of.overlay.write(off, buf)
            of.mtime_ns = now_ns()
            if of.overlay.nbytes > SPILL_BYTES:
                async with self.gc_gate.shared():
                    await fold(self.vol, of, self.stats)
        return len(buf)

    @fuse_handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): mode 0 and KEEP_SIZE (nothing to reserve in a store of shared
        fragments: only the size may grow, as a hole), PUNCH_HOLE (with KEEP_SIZE) and
        ZERO_RANGE make holes; every other mode is EOPNOTSUPP. pyfuse3 3.5.0 passes
        FUSE_FALLOCATE on only as patched by scripts/pyfuse3-patched.sh (a stock build
        leaves the kernel to answer EOPNOTSUPP)."""
        if mode & ~_FALLOC_KNOWN or (mode & FALLOC_FL_PUNCH_HOLE and (
                not mode & FALLOC_FL_KEEP_SIZE or mode & FALLOC_FL_ZERO_RANGE)):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        h = self.handles[fh]
        if not h.claim.writer:
            raise pyfuse3.FUSEError(errno.EBADF)  # the kernel checks first; in process, here
        of = self.open_files[h.node.ino]
        async with of.lock:
            grows = not mode & FALLOC_FL_KEEP_SIZE and end > of.size
            if grows:
                of.overlay.truncate(end)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                of.overlay.punch(offset, end)
            if grows or mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                of.mtime_ns = now_ns()

    @fuse_handler
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE over the live content (stored holes, and those not
        committed yet). pyfuse3 3.5.0 passes FUSE_LSEEK on only as patched by
        scripts/pyfuse3-patched.sh (a stock build leaves the kernel to answer as for a
        file without holes)."""
        h = self.handles[fh]
        of = self.open_files.get(h.node.ino)
        base, overlay = (h.pinned, DirtyOverlay(h.pinned.size)) if h.pinned is not None \
            else (of.base, of.overlay) if of is not None else (None, None)
        if base is None or overlay is None or whence not in (SEEK_DATA, SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if base.count + overlay.extent_count + len(overlay.punched) <= SEEK_INLINE_PARTS:
            return _seek(base, overlay, offset, whence)
        # The hole map is built and walked in Python, in time linear in the fragments:
        # a file of 60,000 holes held the event loop 110 ms a call. In a worker thread;
        # a live file's overlay must not change under it (writes take the lock). A thread
        # slot first, the lock then: the file's writes and reads never wait in the queue
        # behind other users' seeks.
        lock = of.lock if h.pinned is None and of is not None else contextlib.nullcontext()
        async with self._seek_threads, lock:
            return await trio.to_thread.run_sync(_seek, base, overlay, offset, whence)

    async def _truncate(self, node: Inode, size: int) -> None:
        while True:
            with self.vol.store.read() as txn:
                of = self._open_file(txn, node)
            async with of.lock:
                # A truncate by path may come while the last handle's RELEASE is in
                # flight: waiting for the lock, that release may have dropped this open
                # file (nothing was dirty yet), and what is truncated here would then be
                # committed by no one. Take the file as it is now instead.
                if self.open_files.get(node.ino) is not of:
                    continue
                of.overlay.truncate(size)
                of.mtime_ns = now_ns()
            break
        if node.opens == 0:
            # truncate(2) by path: no close will follow, so this is the version.
            await self._commit(node)
            self.open_files.pop(node.ino, None)

    async def _commit(self, node: Inode) -> None:
        """Make the open file's written bytes a new version (a no-op when nothing changed)."""
        of = self.open_files.get(node.ino)
        if of is None or not of.dirty:
            return
        async with of.lock:
            if not of.dirty:
                return
            mtime = of.mtime_ns if of.mtime_ns is not None else now_ns()
            # The stored parent as already decoded (unless a spill replaced the base): a
            # 1 GiB file's record is 2.3 MB, not worth decoding again for a 1-byte edit.
            parent: Version | int = (of.base if of.base.id == of.parent_version
                                     else of.parent_version)
            # A small change reads a few scattered pages of the store: fault them alone,
            # not with the disk's whole readahead window each (see annofs.store.advice).
            # It is re-chunked inline, so the advice lasts only this synchronous stretch.
            # A file with no stored bytes yet (a new one) reads nothing back: no advice,
            # which saves two madvise calls over the whole map per small new file.
            small = of.base.size > 0 and folds_inline(self.vol, of.overlay)
            # Fragments, then the version that uses them: gc may not fall between.
            async with self.gc_gate.shared():
                with random_access(self.vol.store) if small else contextlib.nullcontext():
                    if node.orphan is None:
                        folded = await fold(self.vol, of, self.stats)
                    if node.orphan is not None:
                        # Nothing names the file any more (maybe since the fold began): its
                        # bytes need no version, and stay in the open file until the last
                        # close.
                        node.orphan = dataclasses.replace(node.orphan, size=of.size,
                                                          mtime_ns=mtime)
                        return
                    with self.vol.store.write() as txn:
                        v = self.vol.versions.create(txn, parent, folded.hashes,
                                                     folded.lengths, None)
                        t = now_ns()
                        self._change(txn, node, lambda a: dataclasses.replace(
                            a, target=v.id, size=v.size, mtime_ns=mtime, ctime_ns=t))
            self.stats["commits"] += 1
            of.base, of.parent_version, of.mtime_ns = v, v.id, None
            self.guard.committed(node, v.id)

    @fuse_handler
    async def flush(self, fh: int) -> None:
        self.stats["flushes"] += 1
        await self._commit(self.handles[fh].node)

    @fuse_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._commit(self.handles[fh].node)
        await self.sync()

    @fuse_handler
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        node = h.node
        try:
            await self._commit(node)
        finally:
            node.opens -= 1
            self.guard.release(node, h.claim)
            if node.opens == 0:
                self.open_files.pop(node.ino, None)
            self.inodes.maybe_drop(node)

    # -- the filesystem as a whole ----------------------------------------------------------

    @fuse_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        host = os.statvfs(self.vol.store.path)
        s = pyfuse3.StatvfsData()
        s.f_bsize = host.f_bsize
        s.f_frsize = host.f_frsize
        s.f_blocks = host.f_blocks
        s.f_bfree = host.f_bfree
        s.f_bavail = host.f_bavail
        s.f_files = 1 << 32
        s.f_ffree = (1 << 32) - len(self.inodes)
        s.f_favail = s.f_ffree
        s.f_namemax = MAX_NAME
        return s

    @fuse_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Permissions are checked by the kernel (default_permissions); existence here.
        self._node(inode)
        return True

    async def sync(self) -> None:
        """Flush committed transactions to disk (off the event loop: it waits on I/O)."""
        self.dirty_since_sync = False
        await trio.to_thread.run_sync(self.vol.store.sync)

    def held_versions(self) -> set[int]:
        """Versions open handles serve (pinned, or the base of an open file) and those
        READs waiting for a disk thread read: gc keeps them."""
        held = {h.pinned.id for h in self.handles.values() if h.pinned is not None}
        held |= set(self._disk_reads_of)
        held |= {of.parent_version for of in self.open_files.values()}
        return held

    def unstored_fragments(self) -> set[bytes]:
        """Fragments of open files' versions not stored yet (spilled ahead of a close)."""
        held: set[bytes] = set()
        for of in self.open_files.values():
            if of.base.id < 0:
                held.update(stored_hashes(of.base))
        return held

    async def commit_all(self) -> None:
        """Turn every open file's written bytes into versions (before unmount)."""
        for ino in list(self.open_files):
            node = self.inodes.get(ino)
            if node is not None:
                await self._commit(node)
