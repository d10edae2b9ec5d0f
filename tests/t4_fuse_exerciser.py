"""The random-operation exerciser (benchmarks/exerciser.py) against a real mount, with the
native disk as the oracle, and periodic remounts.

Several thousand operations by default (CI); ANNOFS_FULL=1 runs 100k, ANNOFS_EXERCISER_OPS
sets any count and ANNOFS_EXERCISER_SEED the seed. A mismatch names the seed and the
operation's index and prints a shrunk sequence that still fails.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from conftest import Mount
from fuse_helpers import new_mount, stop_and_check

from benchmarks.exerciser import Exerciser, Generator, Mismatch, Op, shrink

FULL = os.environ.get("ANNOFS_FULL") == "1"
OPS = int(os.environ.get("ANNOFS_EXERCISER_OPS", "100000" if FULL else "10000"))
SEEDS = [int(s) for s in os.environ.get("ANNOFS_EXERCISER_SEED", "1").split(",")]
REMOUNT_EVERY = 5000 if FULL else 1500


def _shrunk(m: Mount, oracle: Path, ops: list[Op]) -> str:
    """Shrink a failing sequence by replaying candidates in fresh directories."""
    counter = itertools.count()

    def fails(candidate: list[Op]) -> bool:
        n = next(counter)
        a, b = m.path / f"replay-{n}", oracle / f"replay-{n}"
        a.mkdir()
        b.mkdir()
        try:
            Exerciser(a, b, check_every=0).run(candidate)
        except Mismatch:
            return True
        return False

    if not fails(ops):
        return "(does not fail again without remounts: not shrunk)"
    small = shrink(ops, fails)
    return "\n".join(f"  {op}" for op in small)


@pytest.mark.timeout(3600 if FULL else 300)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_match_the_native_disk(tmp_path: Path, seed: int) -> None:
    (tmp_path / "fs").mkdir()
    m = new_mount(tmp_path / "fs")
    oracle = tmp_path / "oracle"
    test_root, oracle_root = m.path / "x", oracle / "x"
    test_root.mkdir()
    oracle_root.mkdir(parents=True)

    def remount() -> None:
        m.stop()
        m.start()

    ops = Generator(seed).ops(OPS)
    ex = Exerciser(test_root, oracle_root, seed=seed, remount_every=REMOUNT_EVERY,
                   remount=remount)
    try:
        try:
            run = ex.run(ops)
        except Mismatch as e:
            detail = _shrunk(m, oracle, ops[:e.index + 1])
            pytest.fail(f"{e}\nshrunk (replay with Exerciser.run):\n{detail}", pytrace=False)
        print(f"seed {seed}: {run.ops} operations ({run.errors} failed alike, "
              f"{run.skipped} skipped), {run.tree_checks} tree checks, {run.remounts} "
              f"remounts, {run.seconds:.1f} s, {run.ops / run.seconds:.0f} ops/s")
        assert run.ops == OPS and run.tree_checks > 0
        assert run.errors < run.ops * 0.75, "most operations failed: the generator is off"
    finally:
        stop_and_check(m)
    assert not m.log_problems(), "the daemon logged:\n" + "\n".join(m.log_problems())
