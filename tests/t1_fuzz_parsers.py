"""Hostile input for the parsers of policy files, key files and signed statements: any
input gives the parsed value or one clear one-line error naming the input, never another
exception (hypothesis; the targets are benchmarks/fuzz.py's, whose figure reports
executions per parser). ANNOFS_FUZZ_EXAMPLES raises the number of examples."""

from __future__ import annotations

import os

import pytest

from benchmarks.fuzz import TARGETS, run_examples

EXAMPLES = int(os.environ.get("ANNOFS_FUZZ_EXAMPLES", "300"))


@pytest.mark.parametrize("name", ["policy", "keys", "statement", "ssh-statement"])
def test_fuzz_gives_only_the_clear_error(name: str) -> None:
    with TARGETS[name]() as target:
        n = run_examples(target, EXAMPLES)
    print(f"fuzz {name}: {n} executions")
    assert n >= EXAMPLES // 2
