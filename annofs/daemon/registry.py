"""Where running mounts are recorded, so commands can find a mount from a host path.

A daemon is alive while it holds its store's mount lock (an exclusive flock on
`<store>/mount.lock`, taken before it mounts and released by the kernel when it exits,
however it exits). A pid probe would count a zombie, or a recycled pid, as alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from annofs.errors import UsageError

MOUNT_LOCK = "mount.lock"
# A probe holds the lock shared for an instant: a daemon starting meanwhile retries.
_TAKE_FOR = 2.0


@dataclass(frozen=True)
class MountInfo:
    """A running daemon: its pid, its store, and where it is mounted."""

    pid: int
    store: Path
    mountpoint: Path


def runtime_dir() -> Path:
    """$ANNOFS_RUNTIME_DIR, else $XDG_RUNTIME_DIR/annofs, else /tmp/annofs-UID (mode 0700)."""
    base = os.environ.get("ANNOFS_RUNTIME_DIR")
    if base:
        d = Path(base)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "annofs"
    else:
        d = Path(f"/tmp/annofs-{os.getuid()}")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(d)
    return d


def check_private(d: Path) -> None:
    """UsageError unless `d` is a directory (not a symlink) of ours that nobody else may
    write. /tmp/annofs-UID can be made first by another user: records planted there
    would send commands to their store and pid, and a symlink planted as a record's
    temporary file would have the daemon (root, say) write through it, over any file."""
    try:
        s = os.lstat(d)
    except OSError as e:
        raise UsageError(f"{d}: cannot use the runtime directory ({e.strerror})") from None
    if not stat.S_ISDIR(s.st_mode) or s.st_uid != os.getuid() or s.st_mode & 0o022:
        raise UsageError(f"{d}: the runtime directory is not private to uid {os.getuid()} "
                         f"(owner {s.st_uid}, mode {stat.filemode(s.st_mode)}): remove it, "
                         f"or set ANNOFS_RUNTIME_DIR")


def _record(mountpoint: Path) -> Path:
    key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:32]
    return runtime_dir() / f"{key}.json"


def register(info: MountInfo) -> None:
    """Record a mount (called by the daemon once mounted)."""
    path = _record(info.mountpoint)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": info.pid, "store": str(info.store),
                               "mountpoint": str(info.mountpoint)}))
    os.replace(tmp, path)


def unregister(mountpoint: Path) -> None:
    """Forget a mount (called by the daemon at exit)."""
    with contextlib.suppress(FileNotFoundError):
        _record(mountpoint).unlink()


def daemon_alive(store: Path) -> bool:
    """Whether a daemon serves this store: its mount lock is held."""
    try:
        fd = os.open(store / MOUNT_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file: never mounted (or no store)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's shared lock
    return False


def take_mount_lock(store: Path) -> int:
    """The daemon's lock on its store (a descriptor to keep open while serving).

    UsageError if another daemon holds it. Close-on-exec: no program the daemon starts
    may keep it after the daemon is gone.
    """
    fd = os.open(store / MOUNT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + _TAKE_FOR
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                state = _state_file(store)
                where = (f" at {state['mountpoint']} (pid {state['pid']})"
                         if state is not None else "")
                raise UsageError(f"{store}: already mounted{where}") from None
            time.sleep(0.01)


def lookup(mountpoint: Path) -> MountInfo | None:
    """The live mount at exactly this mountpoint, if any."""
    try:
        raw = json.loads(_record(mountpoint).read_text())
        info = MountInfo(int(raw["pid"]), Path(raw["store"]), Path(raw["mountpoint"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not daemon_alive(info.store):
        return None
    return info if os.path.ismount(info.mountpoint) else None


def find_mount(host_path: Path) -> tuple[MountInfo, list[bytes]] | None:
    """The mount holding a host path and the path's components inside it, if mounted."""
    p = Path(os.path.abspath(host_path))
    for candidate in [p, *p.parents]:
        info = lookup(candidate)
        if info is not None:
            rel = p.relative_to(candidate)
            return info, [os.fsencode(part) for part in rel.parts]
    return None


# The daemon also writes its pid and mountpoint into the store itself.
STATE_FILE = "mount.json"


def read_state(store: Path) -> dict | None:
    """The running daemon's pid and mountpoint, if one is alive for this store."""
    if not daemon_alive(store):
        return None
    return _state_file(store)


def _state_file(store: Path) -> dict | None:
    """What the last daemon wrote in the store (alive or not: check the lock first)."""
    try:
        state = json.loads((store / STATE_FILE).read_text())
        int(state["pid"]), str(state["mountpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def stale_state(store: Path) -> dict | None:
    """The state a daemon left behind without removing it (killed), if any."""
    if daemon_alive(store):
        return None
    return _state_file(store)
