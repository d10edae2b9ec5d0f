"""readdir offsets, one table per directory shared by all its open handles.

An offset handed to the kernel must lead back to a place in the listing (the next
readdir, telldir/seekdir), and listings resume by name so that a resumed call shows the
directory as it is now. Each handle used to keep its own offset -> name map: 200 handles
of a 20,000-entry directory, read to the end and kept open by another user, held 660 MiB
of the daemon. One table per directory holds each name once, however many handles read
it; it goes when the directory's last handle closes.
"""

from __future__ import annotations


class DirOffsets:
    """The offsets of one directory's names while handles of it are open."""

    def __init__(self) -> None:
        self._names: dict[int, bytes] = {}
        self._offsets: dict[bytes, int] = {}
        self.handles = 0  # open handles of the directory

    def offset_of(self, name: bytes) -> int:
        """The offset that resumes after `name` (the same for every handle; never 0)."""
        off = self._offsets.get(name)
        if off is None:
            off = self._offsets[name] = len(self._names) + 1
            self._names[off] = name
        return off

    def rewind(self) -> None:
        """A listing from the start by the directory's only open handle: no offset handed
        out before can be asked for again, so none is kept (a directory listed over and
        over while names come and go would otherwise hold every name it ever had)."""
        if self.handles == 1:
            self._names.clear()
            self._offsets.clear()

    def name_at(self, offset: int) -> bytes | None:
        """The name after which `offset` resumes; None if it is not one of ours."""
        return self._names.get(offset)
