"""`annofs export`: copy a store tree out to a host directory, metadata included."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb

from annofs.errors import UsageError
from annofs.store.records import Attrs
from annofs.volume import Volume

Progress = Callable[[int, int], None]


@dataclass
class ExportStats:
    """What an export wrote."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    hard_links: int = 0


class TreeExporter:
    """Writes one store path (a file or a tree) to a host path that does not exist yet."""

    def __init__(self, vol: Volume, progress: Progress | None = None) -> None:
        self.vol = vol
        self.progress = progress
        self.stats = ExportStats()
        self._links: dict[int, Path] = {}
        self._as_root = os.geteuid() == 0

    def run(self, src: Sequence[bytes], dest: Path) -> ExportStats:
        """Export; the destination's parent must exist and the destination must not."""
        if dest.exists() or dest.is_symlink():
            raise UsageError(f"{dest}: already exists (export writes a new path)")
        if not dest.parent.is_dir():
            raise UsageError(f"{dest.parent}: no such directory")
        with self.vol.store.read() as txn:
            top = self.vol.namespace.resolve(txn, src)
            self._export(txn, top, dest, 0)
        return self.stats

    def size_of(self, src: Sequence[bytes]) -> tuple[int, int]:
        """(regular files, bytes) under `src`, from directory entries alone (no content is
        read): a progress bar's total, worth a walk only when a bar is shown."""
        ns = self.vol.namespace
        files = nbytes = 0
        with self.vol.store.read() as txn:
            stack = [ns.resolve(txn, src)]
            while stack:
                a = stack.pop()
                if a.is_dir:
                    stack.extend(child for _name, child, _link in ns.iter_entries(txn, a.target))
                elif a.is_reg:
                    files += 1
                    nbytes += a.size
        return files, nbytes

    def _export(self, txn: lmdb.Transaction, top: Attrs, top_host: Path, top_link: int) -> None:
        ns = self.vol.namespace
        # An explicit stack, not recursion: a tree may be thousands of levels deep. A
        # directory's metadata is set once its entries are written (writing them changes
        # its mtime, and a read-only mode would refuse them): the `done` entry.
        stack: list[tuple[Attrs, Path, int, bool]] = [(top, top_host, top_link, False)]
        while stack:
            a, host, link, done = stack.pop()
            if done:
                self._set_meta(host, a)
                continue
            if link and link in self._links:
                os.link(self._links[link], host, follow_symlinks=False)
                self.stats.hard_links += 1
                continue
            if a.is_dir:
                os.mkdir(host, 0o700)
                self.stats.dirs += 1
                stack.append((a, host, link, True))
                entries = list(ns.iter_entries(txn, a.target))
                for name, child, child_link in reversed(entries):
                    stack.append((child, host / os.fsdecode(name), child_link, False))
                continue
            if a.is_reg:
                v = self.vol.versions.get(txn, int(a.target))
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    # Holes are seeked over: the copy is as sparse as the file (a 1 PiB
                    # hole costs nothing here, where the host filesystem allows it).
                    for offset, frag in self.vol.versions.iter_extents(txn, v):
                        if isinstance(frag, int):
                            f.seek(offset + frag)
                        else:
                            f.write(frag)
                    f.truncate(v.size)
                self.stats.files += 1
                self.stats.bytes += v.size
                if self.progress:
                    self.progress(1, v.size)
            elif a.is_symlink:
                assert isinstance(a.target, bytes)
                os.symlink(a.target, host)
                self.stats.symlinks += 1
            else:
                os.mknod(host, a.mode, int(a.target))
            if link:
                self._links[link] = host
            self._set_meta(host, a)

    def _set_meta(self, host: Path, a: Attrs) -> None:
        if self._as_root:
            os.lchown(host, a.uid, a.gid)
        if not a.is_symlink:
            os.chmod(host, a.mode & 0o7777)
        os.utime(host, ns=(a.atime_ns, a.mtime_ns), follow_symlinks=False)
