"""stress-ng's filesystem stressors against a real mount: the standard tool for this that a
registry packages here (Debian's stress-ng; pjdfstest, xfstests' fsx and LTP are in
neither Debian nor PyPI). Each stressor runs briefly; `--verify` where it checks data.
The run must succeed, the daemon log nothing, and the store pass fsck afterwards.

What the stressors do not cover and why (see SECURITY.md and README): FIEMAP is not
implemented; of fallocate's modes, annofs does 0, KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE
(COLLAPSE_RANGE, INSERT_RANGE and the rest are EOPNOTSUPP, which the stressor accepts).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest
from conftest import Mount
from fuse_helpers import new_mount, stop_and_check

pytestmark = pytest.mark.skipif(shutil.which("stress-ng") is None,
                                reason="stress-ng is not installed (scripts/setup.sh does)")

SECONDS = "2"
STRESSORS = [
    ["--hdd", "1", "--hdd-bytes", "8M", "--verify"],
    ["--seek", "1", "--seek-size", "16M", "--verify"],
    ["--readahead", "1", "--readahead-bytes", "8M", "--verify"],
    ["--dir", "1"], ["--dirdeep", "1"], ["--dirmany", "1"], ["--dentry", "1"],
    ["--rename", "1"], ["--link", "1"], ["--symlink", "1"], ["--chmod", "1"],
    ["--utime", "1"], ["--filename", "1"], ["--fstat", "1"], ["--getdent", "1"],
    ["--open", "1"], ["--chdir", "1"], ["--sync-file", "1"], ["--copy-file", "1"],
    ["--lockf", "1"], ["--flock", "1"], ["--io", "1"],
    ["--fallocate", "1", "--fallocate-bytes", "8M"],
]


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    m = new_mount(tmp_path_factory.mktemp("stressng"))
    try:
        yield m
    finally:
        stop_and_check(m)
    assert not m.log_problems(), m.log_problems()


@pytest.mark.parametrize("args", STRESSORS, ids=[a[0].lstrip("-") for a in STRESSORS])
def test_stressor_succeeds_on_the_mount(mnt: Mount, args: list[str]) -> None:
    res = subprocess.run(["stress-ng", *args, "--temp-path", str(mnt.path), "-t", SECONDS,
                          "--metrics-brief"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "successful run completed" in res.stdout + res.stderr
    assert "fail" not in (res.stdout + res.stderr).lower()
    assert not mnt.log_problems(), mnt.log_problems()
