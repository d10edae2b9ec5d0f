"""Small files are put in the kernel's page cache at their first open (notify_store)."""

from __future__ import annotations

import os
import random

from conftest import Mount
from fuse_helpers import stats, stop_and_check

from annofs.fs.operations import PUSH_BYTES


def test_small_files_are_pushed_at_first_open_and_read_back_right(mounted: Mount) -> None:
    rng = random.Random(3)
    small, big = rng.randbytes(10_000), rng.randbytes(PUSH_BYTES + 1)
    (mounted.path / "small").write_bytes(small)
    (mounted.path / "big").write_bytes(big)
    (mounted.path / "empty").write_bytes(b"")
    mounted.stop()
    mounted.start()  # a new daemon and new kernel inodes: nothing cached
    before = stats(mounted).get("pushed_files", 0)
    assert (mounted.path / "small").read_bytes() == small
    assert stats(mounted).get("pushed_files", 0) == before + 1
    assert (mounted.path / "big").read_bytes() == big  # too big: read as usual
    assert (mounted.path / "empty").read_bytes() == b""
    assert (mounted.path / "small").read_bytes() == small  # second open: cache kept
    assert stats(mounted).get("pushed_files", 0) == before + 1
    # A change through the mount, then a new reader: the new bytes, whole.
    with open(mounted.path / "small", "r+b") as f:
        f.seek(5000)
        f.write(b"XYZ")
    changed = small[:5000] + b"XYZ" + small[5003:]
    assert (mounted.path / "small").read_bytes() == changed
    with open(mounted.path / "small", "rb") as f:
        assert os.pread(f.fileno(), 10, 4998) == changed[4998:5008]
    stop_and_check(mounted)
