"""The handle rules of trust.admission, one at a time (the mount tests try them for real:
t4_fuse_attacker, t4_fuse_bypass, t4_fuse_cache_versions)."""

from __future__ import annotations

import pytest

from annofs.trust.admission import (
    CACHED_WRITER,
    MIXED,
    ONLY_WRITER,
    OTHER_WRITERS,
    READER_BESIDE_RW,
    RW_BESIDE_READERS,
    Admission,
    Busy,
)

INO = 7


def busy(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(Busy) as e:
        fn(*args, **kwargs)
    return e.value.reason


def test_a_judged_read_write_handle_is_the_only_writer() -> None:
    a = Admission()
    rw = a.reserve(INO, writer=True, verified_rw=True, enforcing=True)
    assert busy(a.reserve, INO, writer=True, verified_rw=False, enforcing=True) == ONLY_WRITER
    a.release(INO, rw)
    w = a.reserve(INO, writer=True, verified_rw=False, enforcing=True)
    assert busy(a.reserve, INO, writer=True, verified_rw=True, enforcing=True) == OTHER_WRITERS
    a.release(INO, w)
    # Not enforcing: nothing is refused, but the slots are still counted.
    a.reserve(INO, writer=True, verified_rw=True, enforcing=False)
    a.reserve(INO, writer=True, verified_rw=False, enforcing=False)
    assert a.state(INO).writers == 2


def test_read_write_and_readers_exclude_each_other_only_on_guarded_files() -> None:
    a = Admission()
    r = a.reserve(INO, writer=False, verified_rw=False, reader=True, enforcing=True)
    assert busy(a.reserve, INO, writer=True, verified_rw=True, enforcing=True,
                guarded=lambda: True) == RW_BESIDE_READERS
    rw = a.reserve(INO, writer=True, verified_rw=True, enforcing=True, guarded=lambda: False)
    a.release(INO, r)
    assert busy(a.reserve, INO, writer=False, verified_rw=False, reader=True,
                enforcing=True, guarded=lambda: True) == READER_BESIDE_RW
    a.release(INO, rw)
    assert a.state(INO).readers == a.state(INO).writers == a.state(INO).verified_rw == 0


def test_writers_of_guarded_files_bypass_the_cache_and_others_keep_it() -> None:
    a = Admission()
    claim, plan = a.admit(INO, a.reserve(INO, writer=True, verified_rw=False, enforcing=True),
                          1, pinned=False, judged=False, guarded=True)
    assert plan.direct_io and not claim.cached_writer
    # A judged reader of a guarded file beside it: around the cache too, and pinned.
    reader, plan = a.admit(INO, a.reserve(INO, writer=False, verified_rw=False, reader=True,
                                          enforcing=True), 1, pinned=True, judged=True,
                           guarded=True)
    assert plan.direct_io and reader.pinned
    other = 8
    claim, plan = a.admit(other, a.reserve(other, writer=True, verified_rw=False,
                                           enforcing=True), 1, pinned=False, judged=False,
                          guarded=False)
    assert not plan.direct_io and claim.cached_writer


def test_a_writer_using_the_cache_keeps_judged_readers_of_a_guarded_file_out() -> None:
    a = Admission()
    w, _ = a.admit(INO, a.reserve(INO, writer=True, verified_rw=False, enforcing=True), 1,
                   pinned=False, judged=False, guarded=False)  # opened under a loose rule
    r = a.reserve(INO, writer=False, verified_rw=False, reader=True, enforcing=True)
    assert busy(a.admit, INO, r, 1, pinned=True, judged=True, guarded=True) == CACHED_WRITER
    a.release(INO, r)
    a.release(INO, w)
    r2, plan = a.admit(INO, a.reserve(INO, writer=False, verified_rw=False, reader=True,
                                      enforcing=True), 1, pinned=True, judged=True,
                       guarded=True)
    assert not plan.direct_io
    a.release(INO, r2)
    st = a.state(INO)
    assert (st.pinned, st.writers, st.readers, st.cached_writers) == (0, 0, 0, 0)


def test_the_cache_is_kept_only_for_the_version_a_handle_serves() -> None:
    a = Admission()
    r1, plan = a.admit(INO, a.reserve(INO, writer=False, verified_rw=False, reader=True,
                                      enforcing=True), 1, pinned=True, judged=True,
                       guarded=True)
    assert not plan.keep_cache  # nothing known cached yet
    _, plan = a.admit(INO, a.reserve(INO, writer=False, verified_rw=False, reader=True,
                                     enforcing=True), 1, pinned=True, judged=True, guarded=True)
    assert plan.keep_cache and not plan.direct_io
    a.committed(INO, 2)  # a writer committed version 2 while readers of 1 are open
    assert a.state(INO).cached_version == MIXED
    _, plan = a.admit(INO, a.reserve(INO, writer=False, verified_rw=False, reader=True,
                                     enforcing=True), 2, pinned=True, judged=True, guarded=True)
    assert plan.direct_io and not plan.keep_cache
    del r1
