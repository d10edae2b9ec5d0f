"""A store-wide lock between commands that write and gc.

Fragments are stored before the version that uses them (so a crash never leaves a
version with missing data); an offline gc running beside such a command would see them
as garbage. Writers hold the lock shared, gc exclusive; a running daemon holds it shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from annofs.errors import StoreError

OPS_LOCK = "ops.lock"


@contextlib.contextmanager
def store_lock(store_path: Path, *, exclusive: bool, what: str) -> Iterator[None]:
    """Hold the store's lock; exclusive fails at once (with a clear error) if it is busy."""
    if not (store_path / "db" / "data.mdb").exists():
        raise StoreError(f"{store_path}: no annofs store here (run 'annofs --store {store_path} "
                         f"init')")
    fd = os.open(store_path / OPS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            raise StoreError(f"{store_path}: busy (mounted, or another command is writing); "
                             f"{what} needs the store to itself") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def try_exclusive(store_path: Path) -> Iterator[bool]:
    """The store lock exclusively if nobody holds it: True while held, False at once if a
    writer or a mount has it (for work that is only worth doing alone, never waited for)."""
    fd = os.open(store_path / OPS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


IMPORT_LOCK = "import.lock"


@contextlib.contextmanager
def import_lease(store_path: Path) -> Iterator[None]:
    """Held (shared) by every import while it runs, including one into a mounted store.

    An import stores fragments and builds a staging tree before anything visible refers to
    them; gc under a mount would take both for garbage. The daemon's gc asks
    `imports_running` first. A killed import's lease goes with its process.
    """
    fd = os.open(store_path / IMPORT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def imports_running(store_path: Path) -> bool:
    """Whether some process holds an import lease on the store."""
    try:
        fd = os.open(store_path / IMPORT_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
