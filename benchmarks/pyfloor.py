"""The floor of a FUSE filesystem on pyfuse3 and trio: forward every call, do nothing else.

annofs runs on pyfuse3 on trio, so each FUSE request costs at least what this
filesystem pays for it: the kernel round trip, pyfuse3's dispatch and a trio checkpoint,
and one host system call. It mirrors a host directory the way libfuse's passthrough_ll
example does (inodes held as O_PATH descriptors, so renames of whole directories need no
path bookkeeping), which is what real tools such as Nix need: pyfuse3's own
passthroughfs.py maps inodes to paths and loses a subtree renamed under it (Nix 2.8's
`nix-store --add` fails on it with "getting status of ...: No such file or directory").

Run it as `python -m benchmarks.pyfloor SOURCE MOUNTPOINT`; it serves in the foreground
until unmounted. Entries and attributes are cached for 1 s, as passthrough_ll's default.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass, field

import pyfuse3
import trio

TIMEOUT = 1.0


@dataclass
class Node:
    """An inode the kernel holds: its O_PATH descriptor and lookup count."""

    fd: int
    key: tuple[int, int]
    lookups: int = 0


@dataclass
class Listing:
    """An open directory: its entries, read once at opendir."""

    ino: int
    names: list[str] = field(default_factory=list)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class FloorFs(pyfuse3.Operations):
    """Forward every FUSE request to the host directory; keep nothing but inodes."""

    supports_dot_lookup = False

    def __init__(self, source: str) -> None:
        super().__init__()
        root = os.open(source, os.O_PATH)
        st = os.fstat(root)
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(root, (st.st_dev, st.st_ino), 1)}
        self.by_key: dict[tuple[int, int], int] = {(st.st_dev, st.st_ino): pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.dirs: dict[int, Listing] = {}

    def _fd(self, ino: int) -> int:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node.fd

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, name, getattr(st, name))
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        return e

    def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self._fd(parent))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        ino = self.by_key.get(key)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.nodes[ino] = Node(fd, key)
            self.by_key[key] = ino
        else:
            os.close(fd)
        self.nodes[ino].lookups += 1
        return self._attr(ino, st)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._lookup(parent_inode, name)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self.nodes[ino]
                del self.by_key[node.key]
                os.close(node.fd)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode, os.fstat(self._fd(inode)))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = _proc(self._fd(inode))
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                st = os.fstat(self._fd(inode))
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return await self.getattr(inode, ctx)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.readlink(b"", dir_fd=self._fd(inode))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def _made(self, parent: int, name: bytes, make: object) -> pyfuse3.EntryAttributes:
        try:
            make()  # type: ignore[operator]
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return self._lookup(parent, name)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        pfd = self._fd(parent_inode)
        return await self._made(parent_inode, name, lambda: os.mkdir(name, mode, dir_fd=pfd))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        pfd = self._fd(parent_inode)
        return await self._made(parent_inode, name,
                                lambda: os.symlink(target, name, dir_fd=pfd))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        pfd = self._fd(parent_inode)
        return await self._made(parent_inode, name,
                                lambda: os.mknod(name, mode, rdev, dir_fd=pfd))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        src, pfd = _proc(self._fd(inode)), self._fd(new_parent_inode)
        return await self._made(new_parent_inode, new_name, lambda: os.link(
            src, new_name, dst_dir_fd=pfd, follow_symlinks=True))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.unlink(name, dir_fd=self._fd(parent_inode))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.rmdir(name, dir_fd=self._fd(parent_inode))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            os.rename(name_old, name_new, src_dir_fd=self._fd(parent_inode_old),
                      dst_dir_fd=self._fd(parent_inode_new))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fd = os.open(_proc(self._fd(inode)), os.O_RDONLY | os.O_DIRECTORY)
        self.dirs[fd] = Listing(inode, sorted(os.listdir(fd)))
        return fd

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.dirs[fh]
        for i in range(start_id, len(listing.names)):
            name = listing.names[i].encode()
            try:
                entry = self._lookup(listing.ino, name)
            except pyfuse3.FUSEError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                await self.forget([(entry.st_ino, 1)])
                return

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh)
        os.close(fh)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            fd = os.open(_proc(self._fd(inode)), flags & ~(os.O_CREAT | os.O_NOFOLLOW))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        try:
            fd = os.open(name, (flags | os.O_CREAT) & ~os.O_NOFOLLOW, mode,
                         dir_fd=self._fd(parent_inode))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return pyfuse3.FileInfo(fh=fd), self._lookup(parent_inode, name)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        os.close(os.dup(fh))

    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        host = os.statvfs(self.nodes[pyfuse3.ROOT_INODE].fd)
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(s, name, getattr(host, name))
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.getxattr(_proc(self._fd(inode)), name)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        try:
            return [n.encode() for n in os.listxattr(_proc(self._fd(inode)))]
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None


def main(argv: list[str]) -> None:
    """Serve SOURCE at MOUNTPOINT until it is unmounted."""
    source, mountpoint = argv
    options = set(pyfuse3.default_options)
    options.add("fsname=pyfloor")
    pyfuse3.init(FloorFs(source), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main(sys.argv[1:])
