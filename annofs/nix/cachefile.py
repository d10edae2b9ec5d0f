"""Reading a binary cache's files without ever blocking on them.

A cache directory is input like any other: a FIFO named `<hash>.narinfo` would block an
ordinary open() until someone writes to it (and `nix fetch` into a mount runs in the
daemon, so the whole mount would wait with it); a device node may do anything when
opened; a file on a hung network or FUSE file system never answers. So a cache file is
opened with O_NONBLOCK (a FIFO then opens at once), must be a regular file (fstat of the
open descriptor: no race with a rename), and every open and read must answer within
CACHE_TIMEOUT seconds (`ANNOFS_CACHE_TIMEOUT`), or the fetch stops with one line.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from annofs.errors import UsageError

CACHE_TIMEOUT = float(os.environ.get("ANNOFS_CACHE_TIMEOUT", "60"))
_BUFFER = 1 << 20  # one timed read per MiB, whatever sizes the decompressor asks for

T = TypeVar("T")


def _timed(path: Path, fn: Callable[[], T]) -> T:
    """`fn()` in a helper thread, waited for at most CACHE_TIMEOUT seconds.

    A thread, because a read of a regular file cannot be interrupted otherwise; one that
    never returns is left behind (a daemon thread: it does not keep the process alive).
    """
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            err.append(e)

    t = threading.Thread(target=run, name="cache-read", daemon=True)
    t.start()
    t.join(CACHE_TIMEOUT)
    if t.is_alive():
        raise UsageError(f"{path}: no answer in {CACHE_TIMEOUT:g} s (a hung file system?); "
                         f"nothing was fetched")
    if err:
        raise err[0]
    return out[0]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> int | None:
    """A descriptor of the regular file at `path` (blocking reads); None if it is absent.

    UsageError (one line naming the file) for anything else: a directory, a FIFO, a
    socket, a device, an unreadable file, or no answer in time.
    """
    def do_open() -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == getattr(os, "ENXIO", 6):  # a socket cannot be opened at all
                raise UsageError(f"{path}: a socket, not a regular file") from None
            raise UsageError(f"{path}: cannot read ({e.strerror})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise UsageError(f"{path}: {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return fd

    return _timed(path, do_open)


class CacheFile(io.RawIOBase):
    """A regular cache file (see open_regular) whose every read answers in time."""

    def __init__(self, fd: int, path: Path) -> None:
        super().__init__()
        self._fd = fd
        self.path = path

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")

        def read() -> int:
            try:
                return os.readv(self._fd, [view])
            except OSError as e:
                raise UsageError(f"{self.path}: cannot read ({e.strerror})") from None

        return _timed(self.path, read)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_cache_file(path: Path) -> io.BufferedReader | None:
    """The regular file at `path`, buffered, every read timed; None if it is absent."""
    fd = open_regular(path)
    if fd is None:
        return None
    return io.BufferedReader(CacheFile(fd, path), buffer_size=_BUFFER)


def read_cache_file(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of the regular file at `path`; None if it is absent."""
    f = open_cache_file(path)
    if f is None:
        return None
    with f:
        return f.read(limit)
