"""Which host files a process opened and read, seen by the kernel (inotify), whichever
process did it: the importer reads in worker processes, so patching `open` would miss it."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

IN_ACCESS = 0x001
IN_OPEN = 0x020
IN_ISDIR = 0x40000000
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class HostReads:
    """An inotify watch on every directory of a host tree (as it is when made)."""

    def __init__(self, root: Path) -> None:
        self._fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._dirs: dict[int, bytes] = {}
        for dirpath, _dirs, _files in os.walk(os.fsencode(root)):
            wd = _libc.inotify_add_watch(self._fd, dirpath, IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch failed", dirpath)
            self._dirs[wd] = dirpath
        self.opened: list[str] = []
        self.read: set[str] = set()

    def _drain(self) -> None:
        while True:
            try:
                buf = os.read(self._fd, 1 << 16)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return
                raise
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, pos)
                name = buf[pos + _EVENT.size: pos + _EVENT.size + size].rstrip(b"\0")
                pos += _EVENT.size + size
                if mask & IN_Q_OVERFLOW:
                    raise AssertionError("inotify queue overflowed: events were lost")
                if mask & IN_ISDIR or not name:
                    continue
                path = os.fsdecode(os.path.join(self._dirs[wd], name))
                if mask & IN_OPEN:
                    self.opened.append(path)
                if mask & IN_ACCESS:
                    self.read.add(path)

    def clear(self) -> None:
        """Forget what was seen so far."""
        self._drain()
        self.opened.clear()
        self.read.clear()

    def paths(self) -> list[str]:
        """Files opened since the last clear, sorted (each once)."""
        self._drain()
        return sorted(set(self.opened))

    def read_paths(self) -> list[str]:
        """Files whose content was read (not only opened) since the last clear, sorted."""
        self._drain()
        return sorted(self.read)

    def close(self) -> None:
        """Stop watching."""
        os.close(self._fd)
