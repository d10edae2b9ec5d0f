"""Helpers shared by the real-mount tests (t4_fuse_*): the store check after a test,
running code as another user, renameat2, and the annofs command line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import pickle
import subprocess
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import Mount, annofs_cmd

from annofs.maintenance.fsck import check_store
from annofs.volume import Volume

NOBODY = 65534


def store_problems(store: Path) -> list[str]:
    """What fsck's checker finds wrong with a store (one read snapshot: also valid while
    a daemon serves the store, for everything it has committed)."""
    vol = Volume.open(store)
    try:
        return check_store(vol).problems
    finally:
        vol.close()


def stop_and_check(m: Mount) -> None:
    """Unmount (if still mounted) and fail unless the store passes fsck's checker."""
    m.stop()
    problems = store_problems(m.store)
    assert not problems, "store inconsistent after the test:\n" + "\n".join(problems)


def remove_and_prune(m: Mount, paths: list[str]) -> None:
    """Unlink `paths` in mount `m` and prune their versions from history (`gc
    --prune-history`): a test's big sparse files, whose every version's digest the
    teardown's fsck would otherwise hash again."""
    for p in paths:
        os.unlink(p)
    subprocess.run(annofs_cmd("--store", str(m.store), "gc", "--prune-history"),
                   check=True, capture_output=True)


def new_mount(base: Path, *extra: str) -> Mount:
    """A fresh store under `base`, mounted by a real daemon (as conftest's `mounted`)."""
    store, mp = base / "store", base / "mnt"
    mp.mkdir()
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   stdout=subprocess.DEVNULL)
    m = Mount(store, mp)
    m.start(*extra)
    return m


def annofs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the annofs command line; output captured as text."""
    return subprocess.run(annofs_cmd(*args), capture_output=True, text=True, check=check)


# -- another user --------------------------------------------------------------------------


class ChildError(Exception):
    """An exception other than OSError raised in a child run as another user."""


def as_user(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` as uid/gid 65534 (no groups) in a forked child."""
    return run_as((NOBODY, NOBODY, ()), fn, *args, **kwargs)


def run_as(creds: tuple[int, int, tuple[int, ...]], fn: Callable[..., Any], *args: Any,
           **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` in a forked child with (uid, gid, groups); its result.

    An OSError in the child is raised again here with the same errno (compare
    `e.errno`). Paths the child uses must be reachable by that user: pass directory file
    descriptors opened here (pytest's tmp_path is private to root).
    """
    uid, gid, groups = creds
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            out: tuple[str, Any] = ("ok", fn(*args, **kwargs))
        except OSError as e:
            out = ("oserror", (e.errno, str(e)))
        except BaseException:
            out = ("error", traceback.format_exc())
        try:
            data = pickle.dumps(out)
        except Exception:
            data = pickle.dumps(("error", f"unpicklable result {out!r}"))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "oserror":
        raise OSError(value[0], value[1])
    if kind == "error":
        raise ChildError(value)
    return value


def restart_on_one_cpu(m: Mount, *extra: str) -> None:
    """Stop `m`'s daemon and start it again (with `extra` options) pinned to one CPU, as a
    one-CPU machine runs it: the daemon inherits this process's affinity at start."""
    m.stop()
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        m.start(*extra)
    finally:
        os.sched_setaffinity(0, allowed)


def in_threads(fn: Callable[[Any], None], args: list[Any]) -> None:
    """`fn(a)` for each of `args`, each in a thread of its own, all at once; returns once
    every one has."""
    threads = [threading.Thread(target=fn, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def stats(m: Mount) -> dict[str, int]:
    """The daemon's work counters (the root's user.annofs.stats, JSON)."""
    return json.loads(os.getxattr(m.path, "user.annofs.stats"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(m: Mount) -> int:
    """The mount's daemon's resident memory in bytes."""
    assert m.proc is not None
    with open(f"/proc/{m.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_at(dirfd: int, name: str) -> bytes:
    """Up to 1 MiB of `name` under an open directory (for run_as: a path walk of the
    caller's own, from a descriptor opened before the fork)."""
    fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def errno_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The errno `fn` fails with; fails the test if it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} succeeded; an error was expected")


# -- renameat2 -----------------------------------------------------------------------------

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
AT_FDCWD = -100


def renameat2(old: Path | str, new: Path | str, flags: int) -> None:
    """rename(2) with flags (glibc's renameat2); OSError with the kernel's errno."""
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old), None, str(new))



@dataclass
class VictimReads:
    """What a victim reading one file in a loop saw while an attack ran."""

    result: Any  # what the attack returned
    counts: dict[str, int]  # read, refused (EACCES), gone (ENOENT)
    wrong: list[bytes]  # every read whose bytes were not the expected ones


def read_while(path: Path, expected: bytes, attack: Callable[[], Any]) -> VictimReads:
    """Read `path` over and over in a thread (this process's uid) while `attack()` runs,
    counting reads, refusals and misses and keeping every read of other bytes."""
    stop = threading.Event()
    seen = VictimReads(None, {"read": 0, "refused": 0, "gone": 0}, [])

    def victim() -> None:
        while not stop.is_set():
            try:
                data = path.read_bytes()
            except PermissionError:
                seen.counts["refused"] += 1
                continue
            except FileNotFoundError:
                seen.counts["gone"] += 1
                continue
            if data != expected:
                seen.wrong.append(data)
            seen.counts["read"] += 1

    t = threading.Thread(target=victim)
    t.start()
    try:
        seen.result = attack()
    finally:
        stop.set()
        t.join()
    return seen
