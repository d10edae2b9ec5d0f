"""t2: a writer that has gone idle does not hold back page reuse for the others.

Every process that wrote keeps a read transaction on the state of its last sync (the
machine-crash pin, annofs.store.env). LMDB reuses no page freed after the oldest reader's
state, so the pin of a process that stopped writing (a mount's daemon while an import
into it runs in another process) made the file grow by every page the others freed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from annofs.store.env import open_store

_IDLE_WRITER = """
import sys, time
from pathlib import Path
from annofs.store.env import open_store
s = open_store(Path(sys.argv[1]))
s.sync_interval = 0.2
with s.write() as t:
    s.put_meta(t, "idle-writer", b"1")
print("ready", flush=True)
time.sleep(120)
"""


def _oldest_other_reader(readers: str, me: int) -> int | None:
    txnids = [int(f[2]) for f in (line.split() for line in readers.splitlines()[1:])
              if len(f) == 3 and int(f[0]) != me]
    return min(txnids, default=None)


def test_an_idle_writer_moves_its_pin_when_others_commit(store_dir: Path) -> None:
    open_store(store_dir, create=True).close()
    child = subprocess.Popen([sys.executable, "-c", _IDLE_WRITER, str(store_dir)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        s = open_store(store_dir)
        try:
            db, value = s.db["importcache"], os.urandom(3000)
            sizes = []
            for _ in range(8):
                with s.write() as t:  # ~6 MB of pages, freed again by the next commit
                    for i in range(2000):
                        t.put(b"k%06d" % i, value, db=db)
                with s.write() as t:
                    for i in range(2000):
                        t.delete(b"k%06d" % i, db=db)
                s.sync()
                last = s.env.info()["last_txnid"]
                deadline = time.monotonic() + 10
                while (_oldest_other_reader(s.env.readers(), os.getpid()) or 0) < last:
                    assert time.monotonic() < deadline, \
                        f"the idle writer's pin stays behind: {s.env.readers()}"
                    time.sleep(0.05)
                sizes.append((store_dir / "db" / "data.mdb").stat().st_size)
        finally:
            s.close()
    finally:
        child.kill()
        child.wait()
    # Pinned, each round added its ~6 MB: 8 rounds were 50 MB more than the first.
    assert sizes[-1] - sizes[1] < 8 << 20, sizes
