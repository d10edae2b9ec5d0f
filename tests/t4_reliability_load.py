"""Load on a real mount: readers and writers, threads and processes, on shared and own
files for a bounded time (benchmarks/load.py says what is checked and why): no hang, no
lost write, every read of a shared file one complete version; latencies printed. Beside
them, `annofs gc` and `annofs cp` run against the daemon over and over.

20 s by default; ANNOFS_FULL=1 runs 120 s with more clients.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from conftest import Mount
from fuse_helpers import annofs, stop_and_check

from benchmarks.load import blob_tag, run_load

FULL = os.environ.get("ANNOFS_FULL") == "1"
SECONDS = float(os.environ.get("ANNOFS_LOAD_SECONDS", "120" if FULL else "20"))
CLIENTS = 16 if FULL else 8


def maintenance(m: Mount, stop: threading.Event, errors: list[str], copies: list[Path]) -> None:
    """gc and O(1) copies of a shared file through the daemon, while the load runs."""
    n = 0
    while not stop.wait(1.0):
        res = annofs("--store", str(m.store), "gc", check=False)
        if res.returncode != 0:
            errors.append(f"gc: {res.stderr}")
        src = m.path / "load" / "shared-0"
        if src.exists():
            n += 1
            dst = m.path / f"copy-{n}"
            res = annofs("cp", str(src), str(dst), check=False)
            if res.returncode != 0:
                errors.append(f"cp: {res.stderr}")
            else:
                copies.append(dst)


def test_concurrent_readers_and_writers(mounted: Mount, tmp_path: Path) -> None:
    seed = int(os.environ.get("ANNOFS_LOAD_SEED") or random.SystemRandom().randrange(1 << 31))
    print(f"ANNOFS_LOAD_SEED={seed}")
    stop, errors, copies = threading.Event(), [], []
    side = threading.Thread(target=maintenance, args=(mounted, stop, errors, copies))
    side.start()
    try:
        rep = run_load(mounted.path / "load", CLIENTS, SECONDS, seed, tmp_path)
    finally:
        stop.set()
        side.join(timeout=120)
    print(rep.summary(), f"; {len(copies)} copies made by annofs cp beside it")
    assert not side.is_alive(), "gc or cp hung"
    assert not errors, "\n".join(errors)
    assert not rep.problems, "\n".join(rep.problems[:20])
    assert rep.lost_writes == 0
    for kind, (n, _, _) in rep.by_kind.items():
        assert n > 0, f"no {kind} operation completed: the load proved nothing"
    for c in copies:  # a copy is one whole version of what it copied
        assert blob_tag(c.read_bytes()) is not None, f"{c.name}: not one whole version"
    stop_and_check(mounted)
