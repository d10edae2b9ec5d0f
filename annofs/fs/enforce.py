"""Enforcing the trust policy at open(): the verdict, the pinned version, the page cache.

An open with read access (O_RDONLY or O_RDWR) of a file is judged on its stored version
(unflushed bytes are committed first: only stored content can carry signatures). A
refused open is EACCES and an event; a read-only handle keeps the version that was
judged, so what was verified is what is read whatever happens to the path later.

The kernel keeps one page cache per inode, shared by every handle. So a handle may reuse
it only if it holds the version that handle serves, and a writer opening an inode that
has pinned readers bypasses it (direct_io): its writes then invalidate the cached range
instead of filling it with unverified bytes, and the readers' reads come back to us.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lmdb
import pyfuse3
import trio

from annofs.fs.inodes import Inode
from annofs.store.records import Version
from annofs.trust.gate import TrustGate
from annofs.trust.signing import path_text
from annofs.trust.verdict import Verdict

log = logging.getLogger("annofs.fs")

# Called for every judged open: (store path, version, verdict, pid).
VerdictSink = Callable[[str, Version, Verdict, int], None]


@dataclass
class CacheState:
    """Per inode: the version the kernel may cache, and how many handles are pinned."""

    cached_version: int | None = None
    pinned: int = 0


class OpenGuard:
    """The policy's word at open(), and the page-cache rules that keep it true."""

    def __init__(self, gate: TrustGate | None, sink: VerdictSink | None = None) -> None:
        self.gate = gate
        self.sink = sink
        self._cache: dict[int, CacheState] = {}

    @property
    def active(self) -> bool:
        """Whether opens are judged at all (a policy is loaded and its mode is not off)."""
        return self.gate is not None and self.gate.enforcing

    def state(self, node: Inode) -> CacheState:
        """The inode's cache state (created on first use)."""
        return self._cache.setdefault(node.ino, CacheState())

    def forget_ino(self, ino: int) -> None:
        """The inode left the table."""
        self._cache.pop(ino, None)

    def judge_in(self, txn: lmdb.Transaction, path: Sequence[bytes], version: Version,
                 pid: int) -> Verdict | None:
        """The verdict for reading `version` at `path`, decided in the read transaction
        the version was read in (no second snapshot, no thread); EACCES (FUSEError) if
        refused. None if the digest is not known yet: then `judge` must hash it first.
        """
        assert self.gate is not None
        if version.digest is None:
            return None
        verdict = self.gate.verdict(path, version, txn)
        self._conclude(path, version, verdict, pid)
        return verdict

    async def judge(self, path: Sequence[bytes], version: Version, pid: int) -> Version:
        """Like `judge_in` for any version: a deferred digest is computed (and recorded)
        in a worker thread first. Returns the version, its digest set."""
        assert self.gate is not None
        if version.digest is None:
            # Hashing the whole content: not on the event loop.
            version = await trio.to_thread.run_sync(self.gate.volume.versions.ensure_digest,
                                                    version)
        self._conclude(path, version, self.gate.verdict(path, version), pid)
        return version

    def _conclude(self, path: Sequence[bytes], version: Version, verdict: Verdict,
                  pid: int) -> None:
        """Tell the sink; raise EACCES if the verdict refuses."""
        if self.sink is None and verdict.allowed:
            return
        text = path_text(path)
        if self.sink is not None:
            try:
                self.sink(text, version, verdict, pid)
            except Exception:
                log.exception("recording the verdict for %s failed", text)
        if not verdict.allowed:
            log.info("refused: %s (pid %d): %s", text, pid, verdict.reason)
            raise pyfuse3.FUSEError(errno.EACCES)

    def file_info(self, fh: int, node: Inode, serves: int, *, pinned: bool,
                  writer: bool) -> pyfuse3.FileInfo:
        """FileInfo for a handle serving version `serves`: keep the cache only if it fits."""
        st = self.state(node)
        keep = st.cached_version == serves
        st.cached_version = serves
        if pinned:
            st.pinned += 1
        direct = writer and st.pinned > 0
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep and not direct, direct_io=direct)

    def released(self, node: Inode, *, pinned: bool) -> None:
        """A handle closed."""
        st = self._cache.get(node.ino)
        if st is not None and pinned:
            st.pinned -= 1

    def committed(self, node: Inode, version: int) -> None:
        """The mount wrote a new version: the kernel's cache holds the writer's bytes."""
        self.state(node).cached_version = version

    def rule_of(self, path: Sequence[bytes]) -> int | str | None:
        """The policy rule a path falls under (an index, None for the default)."""
        if self.gate is None:
            return "none"
        rule = self.gate.policy.rule_at(path)
        return rule.index if rule is not None else None

    def check_link_move(self, src: Sequence[bytes], dst: Sequence[bytes]) -> None:
        """EXDEV for a hard-linked file crossing a policy rule boundary.

        Its names share one content; a name under a looser rule would read what a
        stricter rule guards. EXDEV makes tools treat the boundary like a filesystem's:
        `mv` falls back to copy (which has to pass open) and `ln` says so.
        """
        if self.gate is not None and self.rule_of(src) != self.rule_of(dst):
            raise pyfuse3.FUSEError(errno.EXDEV)
