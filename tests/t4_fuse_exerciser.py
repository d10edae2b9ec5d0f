"""The random-operation exerciser (benchmarks/exerciser.py) against a real mount, with the
native disk as the oracle, and periodic remounts.

Several thousand operations by default (CI); ANNOFS_FULL=1 runs 100k, ANNOFS_EXERCISER_OPS
sets any count and ANNOFS_EXERCISER_SEED the seed. A mismatch names the seed and the
operation's index and prints a shrunk sequence that still fails.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount
from fuse_helpers import NOBODY, as_user, new_mount, stop_and_check

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


@pytest.fixture
def public_base() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="annofs-exerciser-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_as_nobody(test_root: str, oracle_root: str, seed: int, count: int) -> str:
    """In a child dropped to uid/gid 65534: the exerciser's outcome, as text."""
    try:
        run = Exerciser(Path(test_root), Path(oracle_root), seed=seed).run(
            Generator(seed).ops(count))
    except Mismatch as e:
        return f"mismatch: {e}"
    return f"ok {run.ops} {run.errors} {run.errnos.get('EACCES', 0)} {run.errnos.get('EPERM', 0)}"


def test_random_operations_as_another_user(public_base: Path) -> None:
    """The same comparison as an ordinary user (uid 65534) through --allow-other: the
    kernel's permission checks (default_permissions) meet annofs's modes, owners and
    setgid directories; chmod 000 on a directory really locks its owner out."""
    (public_base / "fs").mkdir()
    m = new_mount(public_base / "fs", "--allow-other")
    m.path.chmod(0o755)
    try:
        roots = []
        for root in (m.path / "x", public_base / "oracle"):
            root.mkdir()
            os.chown(root, NOBODY, NOBODY)
            roots.append(str(root))
        count = max(1000, OPS // 3)
        out = as_user(_run_as_nobody, roots[0], roots[1], SEEDS[0], count)
        assert out.startswith("ok "), out
        ops, errors, eacces, eperm = map(int, out.split()[1:])
        assert ops == count and errors < ops
        assert eacces > 0, "no permission was ever denied: the run tests nothing of them"
        print(f"as uid {NOBODY}: {ops} operations ({errors} failed alike, {eacces} EACCES, "
              f"{eperm} EPERM)")
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(public_base / "oracle")], check=False)
        stop_and_check(m)
    assert not m.log_problems(), "the daemon logged:\n" + "\n".join(m.log_problems())
