"""Telling the kernel that names or attributes it caches changed behind its back.

pyfuse3's invalidate calls can deadlock when made inside a handler that touches the same
entry, so changes are queued here and a task of their own sends them.
"""

from __future__ import annotations

import errno
import logging
import math

import pyfuse3
import trio

from annofs.fs.inodes import ROOT, InodeTable

log = logging.getLogger("annofs.daemon")


class Invalidator:
    """A queue of kernel cache invalidations and the task that drains it."""

    def __init__(self) -> None:
        # (kind, inode, name, event): "entry", "inode", or "mark" (its event is set when
        # every invalidation queued before it has been sent).
        self._send, self._recv = trio.open_memory_channel[
            tuple[str, int, bytes, trio.Event | None]](math.inf)

    def entry(self, parent_ino: int, name: bytes) -> None:
        """The name `name` under `parent_ino` changed (or appeared, or went away)."""
        self._send.send_nowait(("entry", parent_ino, name, None))

    def inode(self, ino: int) -> None:
        """An inode's attributes or content changed."""
        self._send.send_nowait(("inode", ino, b"", None))

    def mark(self) -> trio.Event:
        """An event set once every invalidation queued so far has been sent."""
        done = trio.Event()
        self._send.send_nowait(("mark", 0, b"", done))
        return done

    def path_changed(self, inodes: InodeTable, parts: list[bytes]) -> None:
        """A change at a store path: invalidate what the kernel may hold of it and its parent."""
        node = inodes.get(ROOT)
        for name in parts[:-1]:
            if node is None:
                return
            node = inodes.at(node.ino, name)
        if node is None:
            return
        self.inode(node.ino)  # the parent: mtime, nlink, size
        if parts:
            self.entry(node.ino, parts[-1])

    def everything(self, inodes: InodeTable) -> trio.Event:
        """The policy changed: every verdict may differ, so no cached page may be trusted.
        A FIFO's names go too: the kernel opens a FIFO it has a name for without asking,
        and under the new policy its lookup may be refused (OpenGuard.refuse_fifo).
        The FIFOs' names go first; the event returned is set once they are gone (a reload
        waits for it: queued behind every inode, a FIFO stayed reachable after it)."""
        nodes = list(inodes.by_ino.values())
        for node in nodes:
            if node.is_fifo:
                for parent, name in list(node.locations):
                    self.entry(parent, name)
        fifos_gone = self.mark()
        for node in nodes:
            self.inode(node.ino)
        return fifos_gone

    async def run(self) -> None:
        """Send queued invalidations until cancelled.

        The calls block until the kernel has dropped its entry, which may need this
        process to answer a request first: they run in a worker thread so the trio loop
        keeps serving. A failed invalidation is logged; it never ends the mount.
        """
        async for kind, ino, name, done in self._recv:
            if done is not None:
                done.set()
                continue
            try:
                if kind == "entry":
                    await trio.to_thread.run_sync(pyfuse3.invalidate_entry, ino, name)
                else:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing to drop
                    log.warning("invalidate %s %d %r: %s", kind, ino, name, e)
            except Exception:
                log.exception("invalidate %s %d %r failed", kind, ino, name)
