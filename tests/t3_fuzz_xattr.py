"""xattr names and values from hypothesis through the FUSE operations in process: every
call answers with a value or a FUSEError with a fitting errno, nothing is logged (no
traceback turned into EIO), the stored attributes behave like a dictionary, and the store
passes fsck's checker afterwards. ANNOFS_FUZZ_EXAMPLES raises the number of examples."""

from __future__ import annotations

import os

from annofs.maintenance.fsck import check_store
from benchmarks.fuzz import XattrTarget, run_examples

EXAMPLES = int(os.environ.get("ANNOFS_FUZZ_EXAMPLES", "300"))


def test_fuzz_xattrs_give_only_clean_errnos() -> None:
    with XattrTarget() as target:
        n = run_examples(target, EXAMPLES)
        assert n >= EXAMPLES // 2
        assert any(target.model.values()), "no attribute was ever set: the fuzzer is off"
        problems = check_store(target.vol).problems
        assert not problems, "\n".join(problems)
    print(f"fuzz xattr: {n} executions")
