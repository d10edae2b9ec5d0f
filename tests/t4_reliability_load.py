"""Load on a real mount: readers and writers, threads and processes, on shared and own
files for a bounded time (benchmarks/load.py says what is checked and why): no hang, no
lost write, every read of a shared file one complete version; latencies printed.

20 s by default; ANNOFS_FULL=1 runs 120 s with more clients.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from conftest import Mount
from fuse_helpers import stop_and_check

from benchmarks.load import run_load

FULL = os.environ.get("ANNOFS_FULL") == "1"
SECONDS = float(os.environ.get("ANNOFS_LOAD_SECONDS", "120" if FULL else "20"))
CLIENTS = 16 if FULL else 8


def test_concurrent_readers_and_writers(mounted: Mount, tmp_path: Path) -> None:
    seed = int(os.environ.get("ANNOFS_LOAD_SEED") or random.SystemRandom().randrange(1 << 31))
    print(f"ANNOFS_LOAD_SEED={seed}")
    rep = run_load(mounted.path / "load", CLIENTS, SECONDS, seed, tmp_path)
    print(rep.summary())
    assert not rep.problems, "\n".join(rep.problems[:20])
    assert rep.lost_writes == 0
    for kind, (n, _, _) in rep.by_kind.items():
        assert n > 0, f"no {kind} operation completed: the load proved nothing"
    stop_and_check(mounted)
