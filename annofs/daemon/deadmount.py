"""Mounts whose daemon is gone (killed): recognised, and cleared.

After `kill -9` of a daemon the kernel still lists its mount, but every access to it
fails with ENOTCONN ("Transport endpoint is not connected"); `os.path.ismount` says
False, so neither `annofs umount` nor `annofs mount` would see it. A dead mount is one
that /proc/self/mountinfo lists as annofs's FUSE mount and that answers ENOTCONN
(asked only when no live daemon is registered there: a stopped one would not answer).
Clearing it is a lazy unmount: nothing is served there any more, nothing is lost (what
the daemon had committed is in the store).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
from pathlib import Path

from annofs.daemon.readahead import unescape_mountinfo
from annofs.errors import UsageError

FSTYPE = "fuse.annofs"  # subtype=annofs in the mount options
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)
MNT_DETACH = 2


def annofs_mountpoints() -> list[Path]:
    """Every mountpoint the kernel lists as an annofs FUSE mount (dead or alive)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.split():
            continue
        if tail.split()[0] == FSTYPE:
            found.append(Path(unescape_mountinfo(fields[4])))
    return found


def is_dead(mountpoint: Path) -> bool:
    """Whether an annofs mount is listed at `mountpoint` whose daemon no longer answers."""
    mp = Path(os.path.abspath(mountpoint))
    if mp not in annofs_mountpoints():
        return False
    try:
        # statfs always reaches the daemon; stat may be answered from the kernel's
        # attribute cache, dead daemon or not.
        os.statvfs(mp)
    except OSError as e:
        return e.errno in _DEAD
    return False


def clear(mountpoint: Path) -> None:
    """Detach a dead mount: as root, exactly the dead annofs mount at the path as first
    resolved (umount2 MNT_DETACH through a descriptor of it); otherwise fusermount3 -u -z.

    Root may clear a mount under a directory another user controls: between a check by
    path and an unmount by path, that user could swap a parent for a symlink and have
    root detach some other mount. So the path must have no symlinks, and as root the
    checks and the unmount go through one O_PATH descriptor (its mount id, its ENOTCONN,
    /proc/self/fd/N as the path to unmount).
    """
    mp = Path(os.path.abspath(mountpoint))
    real = os.path.realpath(mp)
    if real != str(mp):
        raise UsageError(f"{mp}: a dead mount is cleared only by a path without symlinks "
                         f"(this one leads to {real}); give that path")
    if os.geteuid() != 0:
        res = subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True,
                             text=True)
        if res.returncode == 0:
            return
        raise UsageError(f"{mp}: a dead mount (its daemon is gone) could not be cleared "
                         f"({res.stderr.strip() or 'fusermount3 failed'}); try "
                         f"'fusermount3 -u -z {mp}'")
    fd = os.open(mp, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY)
    try:
        proc = f"/proc/self/fd/{fd}"
        if os.readlink(proc) != str(mp) or not _dead_annofs_mount(fd):
            raise UsageError(f"{mp}: changed while it was being cleared (no longer the dead "
                             f"annofs mount found there); nothing was unmounted")
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.umount2(os.fsencode(proc), MNT_DETACH) == 0:
            return
        why = os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    raise UsageError(f"{mp}: a dead mount (its daemon is gone) could not be cleared ({why}); "
                     f"try 'fusermount3 -u -z {mp}'")


def _dead_annofs_mount(fd: int) -> bool:
    """Whether the descriptor is the root of an annofs FUSE mount whose daemon is gone."""
    mnt_id = None
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "mnt_id":
                mnt_id = value.strip()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        listed = any(line.split()[0] == mnt_id and line.partition(" - ")[2].split()[:1]
                     == [FSTYPE] for line in f if line.strip())
    if not listed:
        return False
    try:
        os.fstatvfs(fd)
    except OSError as e:
        return e.errno in _DEAD
    return False
