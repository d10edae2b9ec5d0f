"""Where running mounts are recorded, so commands can find a mount from a host path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


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
    return d


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


def lookup(mountpoint: Path) -> MountInfo | None:
    """The live mount at exactly this mountpoint, if any."""
    try:
        raw = json.loads(_record(mountpoint).read_text())
        info = MountInfo(int(raw["pid"]), Path(raw["store"]), Path(raw["mountpoint"]))
        os.kill(info.pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
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
    try:
        state = json.loads((store / STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state
