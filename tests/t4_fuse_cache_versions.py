"""The kernel's page cache of an inode shared by handles serving different versions: a
reader pinned to the version it opened, a writer that committed a newer one since, and
the handles opened after (annofs.fs.enforce). Every handle reads the bytes it serves.
"""

from __future__ import annotations

import os
import subprocess

from conftest import Mount, annofs_cmd
from t4_fuse_trust import signed

__all__ = ["signed"]  # the fixture, used by name

OLD = b"old content 1234\n"
NEW = b"NEW CONTENT 5678\n"


def test_a_pinned_reader_after_a_commit_does_not_leave_its_version_for_new_opens(
        signed: Mount) -> None:
    """A reader of a file under a rule that needs signers is pinned to the version it was
    judged on. It re-reads after a writer (direct_io) committed a newer one, which is then
    signed: its old bytes went back into the cache, and the next open must not be given
    them for the new version."""
    f = signed.path / "src" / "proj" / "lib" / "util.c"
    old, new = f.read_bytes(), b"int util(void) { return 2; }\n"
    assert len(old) == len(new) and old != new
    with open(f, "rb", buffering=0) as old_reader:
        assert old_reader.read() == old
        with os.fdopen(os.open(f, os.O_WRONLY), "wb", buffering=0) as w:
            w.write(new)
        old_reader.seek(0)
        assert old_reader.read() == old  # pinned
        # Signed through the mount (the daemon stores the statement).
        subprocess.run(annofs_cmd("sign", "--key", str(signed.store.parent / "keys" /
                                                       "alice-1.secret"),
                                  str(signed.path / "src" / "proj")),
                       check=True, capture_output=True)
        with open(f, "rb", buffering=0) as new_reader:  # while the pinned one is open
            assert new_reader.read() == new
            old_reader.seek(0)
            assert old_reader.read() == old
    assert f.read_bytes() == new  # after both closed


def test_a_reader_where_no_signers_are_needed_reads_the_file_as_it_is(
        signed: Mount) -> None:
    """Where no rule needs signers a reader is not pinned: it reads what writers commit, as
    on a mount without a policy (pinned, its short READs beside an appending writer put
    zeros in the shared cache: tests/t4_fuse_attacker_s9.py, SECURITY.md finding 16)."""
    (signed.path / "scratch").mkdir()
    f = signed.path / "scratch" / "a.txt"
    f.write_bytes(OLD)
    with open(f, "rb", buffering=0) as reader:
        assert reader.read() == OLD
        with open(f, "wb", buffering=0) as w:
            w.write(NEW)
        reader.seek(0)
        assert reader.read() == NEW
        with open(f, "ab", buffering=0) as w:
            w.write(OLD)
        reader.seek(0)
        assert reader.read() == NEW + OLD
    assert f.read_bytes() == NEW + OLD


def test_a_writer_opened_before_a_pinned_reader(signed: Mount) -> None:
    f = signed.path / "src" / "proj" / "main.c"
    original = f.read_bytes()
    patch = b"int evil(void) { return 666; }\n"
    # Write-only: a read-write handle on a guarded file is its only judged handle (EBUSY
    # for readers beside it, t4_fuse_attacker); a write-only one is not judged.
    with os.fdopen(os.open(f, os.O_WRONLY), "wb", buffering=0) as w, \
            open(f, "rb", buffering=0) as r:
        assert r.read() == original
        w.write(patch)  # after the reader's open: not what it was judged on
        r.seek(0)
        assert r.read() == original
