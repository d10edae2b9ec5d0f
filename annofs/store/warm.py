"""Warming a store into the page cache when a mount starts: big sequential reads, not faults.

A cold mount otherwise meets the disk one small read at a time, on its single event loop:
LMDB faults in the B-tree pages a lookup or an open needs, and each first open of a small
file preads its fragments. The kernel's readahead keeps a pack's reads ahead of a reader
that goes through it in order, but not the LMDB map's faults, nor the stalls in between.
borg does the same at `borg mount`: it reads its index and the archive's metadata whole.

Measured (`tar -cf - .` of Debian's linux-source-6.1 tree, 78.6k files, imported; the
store is 40 MB of data.mdb and 274 MB of packs; caches dropped before each mount, load
average 3-5 on 2 cores): 54.2, 43.5, 46.2 and 36.5 s cold; 42.8 and 33.3 s with the
store's files read (cat) before the tar started; 31.9 and 34.6 s with this warming (328
MB read in 0.35-0.45 s, while the tar ran); at load 2.1-2.3, interleaved: 31.1 and 41.0 s
before, 25.9 and 28.3 s after (native cold: 13.5 s).

What is read is bounded: a quarter of the memory the kernel reports available, and at
most MAX_WARM; the index first (every request needs it), then packs from the oldest (the
order an import writes them, and a walk of the tree reads them), but packs only when the
whole store fits the budget: of a larger store, which packs a user's first reads will
need is unknown, and the oldest gigabytes would be read for nothing at every mount
(`warm_plan`). The pages go to the page
cache, never to the daemon's own memory (one reused buffer), and the kernel drops them
first when memory is short. The reads run in a thread of their own (os.preadv releases
the GIL) and stop at unmount.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from annofs.store.packs import packs_dir

log = logging.getLogger("annofs.store")

CHUNK = 4 << 20  # one read: few GIL hand-overs, and the disk sees large requests
# At most this much, whatever the memory: about a second of this machine's disk, so that a
# mount of a large store does not keep the disk busy for long on everything else's behalf.
MAX_WARM = 2 << 30
MEMINFO = Path("/proc/meminfo")


def available_bytes(meminfo: Path = MEMINFO) -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when it cannot be read)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def warm_order(store_path: Path) -> list[Path]:
    """The store's files in the order they are read: data.mdb, then packs oldest first."""
    packs = []
    with os.scandir(packs_dir(store_path)) as it:
        for e in it:
            if e.name.endswith(".pack") and e.is_file(follow_symlinks=False):
                packs.append((e.stat(follow_symlinks=False).st_mtime_ns, e.name, Path(e.path)))
    return [store_path / "db" / "data.mdb"] + [p for _m, _n, p in sorted(packs)]


def warm_plan(paths: list[Path], budget: int) -> list[Path]:
    """What to read of `paths` (`warm_order`'s): all of them when their sizes add up to
    at most `budget`, else the index alone (`budget` still bounds it)."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            continue  # gone meanwhile: nothing to read
    return list(paths) if total <= budget else paths[:1]


def warm(paths: list[Path], budget: int, stop: threading.Event) -> int:
    """Read `paths` in order into the page cache, at most `budget` bytes; returns how many
    were read. A file gone meanwhile (gc, compaction) is passed over."""
    buf = bytearray(CHUNK)
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            offset = 0
            while done < budget and not stop.is_set():
                n = os.preadv(fd, [memoryview(buf)[:min(CHUNK, budget - done)]], offset)
                if n <= 0:
                    break
                offset += n
                done += n
        except OSError as e:
            log.info("warming %s stopped: %s", path, e)
        finally:
            os.close(fd)
        if done >= budget or stop.is_set():
            break
    return done


def start_warming(store_path: Path, stop: threading.Event) -> threading.Thread:
    """Warm the store in a daemon thread (see the module's docstring); `stop` ends it."""
    def run() -> None:
        start = time.perf_counter()
        try:
            paths = warm_order(store_path)
        except OSError as e:
            log.info("not warming %s: %s", store_path, e)
            return
        budget = min(available_bytes() // 4, MAX_WARM)
        done = warm(warm_plan(paths, budget), budget, stop)
        log.info("warmed %.0f MB of %s into the page cache in %.2f s (budget %.0f MB)",
                 done / 1e6, store_path, time.perf_counter() - start, budget / 1e6)

    thread = threading.Thread(target=run, name="annofs-warm", daemon=True)
    thread.start()
    return thread
