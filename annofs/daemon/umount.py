"""Unmounting: `annofs umount` waits for the daemon to flush everything and exit.

Apart from annofs.daemon.mount, which imports pyfuse3, trio and every layer the daemon
serves with: `annofs umount` needs none of them (they were most of its start-up).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from annofs.daemon import deadmount, registry
from annofs.errors import UsageError


def umount(mountpoint: Path, timeout: float = 60.0) -> tuple[str | None, Path | None]:
    """Unmount (the daemon flushes everything) and wait for the daemon to exit.

    Returns (a line for the command to print, the store whose daemon exited). A dead mount
    (its daemon was killed) is cleared instead, and the line says so.
    """
    mp = Path(os.path.abspath(mountpoint))
    with contextlib.suppress(OSError):  # a dead mount cannot be resolved: keep it as given
        mp = mp.resolve()
    info = registry.lookup(mp)
    if info is None and deadmount.is_dead(mp):
        deadmount.clear(mp)
        registry.unregister(mp)
        return f"{mp}: its daemon was gone (killed?); cleared the dead mount", None
    if not os.path.ismount(mp):
        raise UsageError(f"{mp}: not mounted")
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise UsageError(f"{mp}: unmount failed: {res.stderr.strip() or 'fusermount3 failed'}")
    if info is None:
        return None, None
    # The daemon has finished (flushed, closed the store) when it lets go of its lock;
    # a zombie daemon holds nothing, so a parent that does not reap it cannot stall this.
    # Then its process ends (a script may wait on it): a zombie counts as ended.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not registry.daemon_alive(info.store) and _exited(info.pid):
            return None, info.store
        time.sleep(0.02)
    raise UsageError(f"{mp}: unmounted, but the daemon (pid {info.pid}) has not exited")


def _exited(pid: int) -> bool:
    """Whether a process is gone. A zombie is: it has exited, and only its parent (a
    supervisor, or a test harness running `mount --foreground`) has yet to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state == b"Z"
