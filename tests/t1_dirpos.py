"""fs/dirpos.py: readdir offsets shared by a directory's open handles."""

from __future__ import annotations

from annofs.fs.dirpos import DirOffsets


def test_offsets_are_stable_never_zero_and_lead_back_to_their_name() -> None:
    t = DirOffsets()
    t.handles = 2
    a, b = t.offset_of(b"a"), t.offset_of(b"b")
    assert 0 not in (a, b) and a != b
    assert t.offset_of(b"a") == a  # the same for every handle, asked again
    assert (t.name_at(a), t.name_at(b), t.name_at(99)) == (b"a", b"b", None)


def test_a_rewind_by_the_only_handle_forgets_the_names_and_by_one_of_two_keeps_them() -> None:
    # A directory listed over and over from the start while names come and go would
    # otherwise hold every name it ever had (found by a second reader of dirpos).
    t = DirOffsets()
    t.handles = 2
    for i in range(1000):
        t.offset_of(b"n%d" % i)
    t.rewind()  # another handle may still seek to any of them
    assert t.name_at(1000) == b"n999"
    t.handles = 1
    t.rewind()
    assert t.name_at(1) is None and t.name_at(1000) is None
    assert t.offset_of(b"n5") == 1
