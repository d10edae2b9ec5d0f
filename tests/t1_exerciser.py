"""The exerciser itself (benchmarks/exerciser.py), on two native directories: identical
trees agree, a filesystem that gets one thing wrong is caught at the operation that shows
it, and shrinking leaves a short sequence that still fails."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from benchmarks.exerciser import Exerciser, Generator, Mismatch, Op, Side, shrink


def test_two_native_trees_agree(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    run = Exerciser(a, b, seed=9, check_every=100).run(Generator(9).ops(2000))
    assert run.ops == 2000 and run.tree_checks >= 20
    assert set(run.kinds) >= {"create", "rename", "link", "exchange", "fd_write", "setxattr"}
    assert 0 < run.errors < run.ops


class TruncateKeepsOldBytes(Side):
    """A broken filesystem: growing a file with truncate shows stale bytes, not zeros."""

    def _run(self, op: Op) -> object:
        if op.kind == "truncate":
            path = self.p(op.args[0])
            if os.path.isfile(path) and op.args[1] > os.path.getsize(path):
                with open(path, "ab") as f:
                    f.write(b"\x01" * (op.args[1] - os.path.getsize(path)))
                return op.args[1]
        return super()._run(op)


def _failing(tmp_path: Path) -> tuple[list[Op], int]:
    ops = Generator(4).ops(3000)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ex = Exerciser(a, b, seed=4, check_every=50)
    ex.test = TruncateKeepsOldBytes(a)
    with pytest.raises(Mismatch) as e:
        ex.run(ops)
    assert e.value.seed == 4 and "seed 4, op #" in str(e.value)
    return ops[:e.value.index + 1], e.value.index


def test_a_wrong_filesystem_is_caught_and_shrunk(tmp_path: Path) -> None:
    ops, index = _failing(tmp_path)
    counter = itertools.count()

    def fails(candidate: list[Op]) -> bool:
        n = next(counter)
        a, b = tmp_path / f"ra{n}", tmp_path / f"rb{n}"
        a.mkdir()
        b.mkdir()
        ex = Exerciser(a, b, check_every=0)
        ex.test = TruncateKeepsOldBytes(a)
        try:
            ex.run(candidate)
        except Mismatch:
            return True
        return False

    small = shrink(ops, fails, budget_s=30)
    assert fails(small)
    assert len(small) <= 6 < index, small  # (6 since the generator draws far offsets)
    assert any(op.kind == "truncate" for op in small)
