"""Which handles a file may have at once, and which may use the kernel's page cache.

Invariant (a): a reader under a rule that needs signers sees only the bytes of the
version it was judged on. The verdict (`gate`) is half of it; the other half is here,
because the kernel keeps one page cache per inode, shared by every handle and every
mapping, and fills it from whichever handle faults a page in:

- A read-only handle is pinned to the version judged at its open. It may reuse the
  cache only if the cache holds that version (`keep_cache`); once a writer committed a
  newer one while pinned readers still fill the cache with theirs, new handles bypass it
  (`MIXED`) until they are gone.
- A writer on a *guarded* file (some name's rule needs signers) bypasses the cache
  (direct I/O): its writes invalidate the cached range instead of filling it, and a
  shared mapping of it is refused by the kernel (ENODEV; libfuse 3.14 does not offer
  FUSE_DIRECT_IO_ALLOW_MMAP). Otherwise a MAP_SHARED page written without msync would
  sit in the cache, unseen by the daemon, and a reader judged on the stored version
  would read it. Writers elsewhere keep the cache: only guarded files pay.
- A judged reader opened while any writer is open bypasses the cache too and stays
  pinned; a judged reader of a guarded file while a writer that uses the cache is open
  (opened where no signers were needed, then renamed or moved in, or opened before the
  policy was enforcing) is refused: that writer's dirty pages are bytes nobody judged.
- A judged read-write handle reads the file as it is (its own writes included), so
  while one is open it is the file's only writer; truncation counts as writing
  (O_TRUNC of any open, truncate by path). On a guarded file it is the only judged
  handle too: the pages it maps privately are faulted in through it, with bytes it wrote
  and nobody judged, into the one cache that readers read (and map: exec, ld.so).

Slots are taken (`reserve`) before the opener waits for anything (committing, hashing a
deferred digest, explaining a refusal), so two opens that overlap are always seen by
each other; a failed open gives its slot back (`release`). Refusals are `Busy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# `CacheState.cached_version` when the kernel's cache may hold bytes of more than one
# version: pinned readers of an older one read it, a newer one was committed meanwhile.
MIXED = -1


class Busy(Exception):
    """An open or truncate refused to keep invariant (a) (the mount answers EBUSY)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


ONLY_WRITER = ("busy: a judged read-write handle has it open, and must be its only "
               "writer (it reads the file as it is)")
OTHER_WRITERS = ("busy: another handle may write it; a judged read-write handle must be "
                 "its only writer")
RW_BESIDE_READERS = ("busy: readers judged on a signed version have it open; a read-write "
                     "handle would put unjudged bytes in the page cache they read")
READER_BESIDE_RW = ("busy: a read-write handle has it open; the page cache may hold bytes "
                    "it wrote that nobody judged")
CACHED_WRITER = ("busy: a writer that uses the page cache has it open (opened where no "
                 "signatures were needed); bytes it maps or writes are not judged")


@dataclass
class CacheState:
    """Per inode: the version the kernel may cache and the handles that hold slots."""

    cached_version: int | None = None
    pinned: int = 0  # read-only handles serving a judged version
    writers: int = 0  # handles (or truncates) that may write, reserved ones included
    verified_rw: int = 0  # judged read-write handles, reserved ones included
    readers: int = 0  # other judged handles (read-only), reserved ones included
    cached_writers: int = 0  # writers that use the page cache


@dataclass(slots=True)
class Claim:
    """What one handle holds in its inode's state; given back with `release`. (Mutable,
    with slots: one is made per open, on the hot path; each belongs to one handle.)"""

    writer: bool = False
    verified_rw: bool = False
    reader: bool = False  # judged, read-only
    pinned: bool = False
    cached_writer: bool = False


@dataclass(slots=True)
class CachePlan:
    """How a handle may use the kernel's page cache."""

    keep_cache: bool
    direct_io: bool


class Admission:
    """The handle rules of every inode of one mount."""

    def __init__(self) -> None:
        self._states: dict[int, CacheState] = {}

    def state(self, ino: int) -> CacheState:
        """The inode's state (created on first use)."""
        st = self._states.get(ino)
        if st is None:  # (not setdefault: that would build a state on every call)
            st = self._states[ino] = CacheState()
        return st

    def forget(self, ino: int) -> None:
        """The inode left the mount's table."""
        self._states.pop(ino, None)

    def reserve(self, ino: int, *, writer: bool, verified_rw: bool, enforcing: bool,
                reader: bool = False, guarded: Callable[[], bool] = lambda: True) -> Claim:
        """Take the slots of a handle (or truncate) about to be opened; `Busy` if the
        one-writer rule forbids it. Call before anything the opener waits for.

        `reader`: a judged read-only open. `guarded`: whether the file is guarded, asked
        only when a read-write handle and a reader would meet.
        """
        st = self.state(ino)
        if enforcing:
            if writer and st.verified_rw:
                raise Busy(ONLY_WRITER)
            if verified_rw and st.writers:
                raise Busy(OTHER_WRITERS)
            if verified_rw and st.readers and guarded():
                raise Busy(RW_BESIDE_READERS)
            if reader and st.verified_rw and guarded():
                raise Busy(READER_BESIDE_RW)
        st.writers += writer
        st.verified_rw += verified_rw
        st.readers += reader
        return Claim(writer=writer, verified_rw=verified_rw, reader=reader)

    def admit(self, ino: int, claim: Claim, serves: int, *, pinned: bool, judged: bool,
              guarded: bool) -> tuple[Claim, CachePlan]:
        """How the reserved handle serving version `serves` uses the cache; the claim it
        then holds (`claim`, updated). `Busy` (the claim is unchanged: release it) for a
        judged reader of a guarded file beside a writer that uses the cache."""
        st = self.state(ino)
        if judged and guarded and st.cached_writers:
            raise Busy(CACHED_WRITER)
        # A writer: if guarded, nothing it writes or maps may reach a reader through the
        # cache; beside pinned readers, it must not refill their cache with its bytes.
        # A judged reader of a guarded file beside writers: pinned, and around the cache.
        direct = ((guarded or st.pinned > 0) if claim.writer
                  else guarded and judged and st.writers > 0)
        cached_writer = claim.writer and not direct
        if pinned or cached_writer:
            st.pinned += pinned
            st.cached_writers += cached_writer
            claim.pinned, claim.cached_writer = pinned, cached_writer
        if st.cached_version == MIXED and st.pinned > (1 if pinned else 0):
            # Readers pinned to an older version still fill the cache with it: reading
            # it, this handle would get those bytes instead of the ones it serves.
            return claim, CachePlan(keep_cache=False, direct_io=True)
        keep = st.cached_version == serves
        st.cached_version = serves
        return claim, CachePlan(keep_cache=keep and not direct, direct_io=direct)

    def release(self, ino: int, claim: Claim) -> None:
        """A handle closed, a truncate ended, or an open failed: its slots are free."""
        st = self._states.get(ino)
        if st is not None:
            st.pinned -= claim.pinned
            st.writers -= claim.writer
            st.verified_rw -= claim.verified_rw
            st.readers -= claim.reader
            st.cached_writers -= claim.cached_writer

    def committed(self, ino: int, version: int) -> None:
        """The mount stored a new version: the kernel's cache holds the writer's bytes,
        unless readers pinned to the version before are open: they went on filling it
        with theirs (the writer went around it)."""
        st = self.state(ino)
        st.cached_version = MIXED if st.pinned > 0 else version
