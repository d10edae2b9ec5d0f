"""Enforcing the trust policy at open(): the verdict, the pinned version, the page cache.

An open with read access (O_RDONLY or O_RDWR) of a file is judged on its stored version
(unflushed bytes are committed first: only stored content can carry signatures). A
refused open is EACCES and an event; a read-only handle keeps the version that was
judged, so what was verified is what is read whatever happens to the path later.

The kernel keeps one page cache per inode, shared by every handle. So a handle may reuse
it only if it holds the version that handle serves, and a writer opening an inode that
has pinned readers bypasses it (direct_io): its writes then invalidate the cached range
instead of filling it with unverified bytes, and the readers' reads come back to us.
Once such a writer has committed, the pinned readers still fill the cache with their own
(older) version: until the last of them closes, new handles bypass the cache too, and the
next open after that drops it (`_MIXED`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb
import pyfuse3
import trio

from annofs.fs.inodes import Inode
from annofs.store.records import Version
from annofs.trust.gate import TrustGate
from annofs.trust.policy import Mode
from annofs.trust.signing import path_text
from annofs.trust.symlink import Content, signers_needed
from annofs.trust.verdict import Verdict

if TYPE_CHECKING:
    from annofs.explain.report import Explanation

log = logging.getLogger("annofs.fs")

# Called for every judged open or symlink read: (store path, content, verdict, pid, the
# explanation of a refusal or None). The content is a file's version or a symlink's.
VerdictSink = Callable[[str, Content, Verdict, int, "Explanation | None"], None]
# Explains a refusal of the caller with the given uid, off the event loop; None when it
# chose not to (a rate limit, per uid).
RefusalExplainer = Callable[[Sequence[bytes], Content, Verdict, int],
                            Awaitable["Explanation | None"]]


# Worker threads one uid may keep busy hashing content (a deferred digest: up to 16 GiB
# of a sparse file's zeros). Without a bound per uid, one user opening many such files
# took every worker thread, and everyone else's opens waited behind them.
HASH_THREADS_PER_UID = 2
_HASH_UIDS = 1024  # limiters kept; beyond that, the idle ones are dropped


# `CacheState.cached_version` when the kernel's cache may hold bytes of more than one
# version: pinned readers of an older one read it, a newer one was committed meanwhile.
_MIXED = -1


@dataclass
class CacheState:
    """Per inode: the version the kernel may cache, how many handles are pinned, how many
    may write, and how many are verified read-write handles."""

    cached_version: int | None = None
    pinned: int = 0
    writers: int = 0
    verified_rw: int = 0


class OpenGuard:
    """The policy's word at open(), and the page-cache rules that keep it true."""

    def __init__(self, gate: TrustGate | None, sink: VerdictSink | None = None,
                 explainer: RefusalExplainer | None = None) -> None:
        self.gate = gate
        self.sink = sink
        self.explainer = explainer
        self._cache: dict[int, CacheState] = {}
        self._hashers: dict[int, trio.CapacityLimiter] = {}

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

    def judge_in(self, txn: lmdb.Transaction, path: Sequence[bytes],
                 version: Version) -> Verdict | None:
        """The verdict for reading `version` at `path`, decided in the read transaction
        the version was read in (no second snapshot, no thread). None if the digest is not
        known yet: then `judge` must hash it first. `conclude` acts on the verdict.
        """
        assert self.gate is not None
        if version.digest is None:
            return None
        return self.gate.verdict(path, version, txn)

    def hasher(self, uid: int) -> trio.CapacityLimiter:
        """The worker threads `uid` may use to hash content (HASH_THREADS_PER_UID)."""
        limiter = self._hashers.get(uid)
        if limiter is None:
            if len(self._hashers) >= _HASH_UIDS:
                self._hashers = {u: lim for u, lim in self._hashers.items()
                                 if lim.borrowed_tokens}
            limiter = self._hashers[uid] = trio.CapacityLimiter(HASH_THREADS_PER_UID)
        return limiter

    async def ensure_digest(self, version: Version, uid: int) -> Version:
        """`version` with its digest, computed (and recorded) if deferred: in a worker
        thread (not on the event loop) out of `uid`'s own few (`hasher`)."""
        assert self.gate is not None
        if version.digest is not None:
            return version
        return await trio.to_thread.run_sync(self.gate.volume.versions.ensure_digest,
                                             version, limiter=self.hasher(uid))

    async def judge(self, path: Sequence[bytes], version: Version,
                    uid: int) -> tuple[Version, Verdict]:
        """Like `judge_in` for any version: a deferred digest is computed (and recorded)
        first, in one of `uid`'s hashing threads. Returns the version, its digest set,
        and the verdict."""
        assert self.gate is not None
        version = await self.ensure_digest(version, uid)
        return version, self.gate.verdict(path, version)

    async def conclude(self, path: Sequence[bytes], version: Content, verdict: Verdict,
                       pid: int, uid: int = 0) -> None:
        """Record the verdict; a refusal is explained first, then raised as EACCES.
        `version` is the content judged: a file's version, or a symlink's (readlink).

        The explanation is made before the caller sees EACCES, so by the time a tool
        reports the failure, the daemon log and the events log say why.
        """
        if verdict.allowed and self.sink is None:
            return
        text = path_text(path)
        explanation = None
        if not verdict.allowed and self.explainer is not None:
            try:
                explanation = await self.explainer(path, version, verdict, uid)
            except Exception as e:  # the refusal stands; only its explanation is missing
                log.warning("explaining the refusal of %s failed: %s", text, e)
        if self.sink is not None:
            try:
                self.sink(text, version, verdict, pid, explanation)
            except Exception:
                log.exception("recording the verdict for %s failed", text)
        if not verdict.allowed:
            if explanation is not None:
                from annofs.explain.report import summary_line
                log.info("pid %d: %s", pid, summary_line(explanation))
            else:
                log.info("refused: %s (pid %d): %s", text, pid, verdict.reason)
            raise pyfuse3.FUSEError(errno.EACCES)

    def file_info(self, fh: int, node: Inode, serves: int, *, pinned: bool,
                  writer: bool) -> pyfuse3.FileInfo:
        """FileInfo for a handle serving version `serves`: keep the cache only if it fits."""
        st = self.state(node)
        if pinned:
            st.pinned += 1
        if st.cached_version == _MIXED and st.pinned > (1 if pinned else 0):
            # Readers pinned to an older version still fill the cache with it: reading
            # it, this handle would get those bytes instead of the ones it serves.
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=True)
        keep = st.cached_version == serves
        st.cached_version = serves
        direct = writer and st.pinned > 0
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep and not direct, direct_io=direct)

    def check_writers(self, node: Inode, *, writer: bool, verified_rw: bool) -> None:
        """EBUSY for a second writer beside a verified read-write handle.

        A read-write handle is judged at open like a reader, but it is not pinned: it
        reads the file as it is, its own writes included. So while one is open it must
        be the inode's only writer, or another handle could write unverified bytes for
        it to read; and it cannot be opened beside another writer. (Truncate by path
        is a writer too: `check_truncate`.)
        """
        if not self.active:
            return
        st = self.state(node)
        if (writer and st.verified_rw) or (verified_rw and st.writers):
            raise pyfuse3.FUSEError(errno.EBUSY)

    def check_truncate(self, node: Inode, by_verified_rw: bool) -> None:
        """EBUSY for a truncate beside a verified read-write handle, unless through it."""
        if self.active and not by_verified_rw and self.state(node).verified_rw:
            raise pyfuse3.FUSEError(errno.EBUSY)

    def opened(self, node: Inode, *, writer: bool, verified_rw: bool) -> None:
        """A handle was opened (after `check_writers`)."""
        st = self.state(node)
        st.writers += writer
        st.verified_rw += verified_rw

    def released(self, node: Inode, *, pinned: bool, writer: bool = False,
                 verified_rw: bool = False) -> None:
        """A handle closed."""
        st = self._cache.get(node.ino)
        if st is not None:
            st.pinned -= pinned
            st.writers -= writer
            st.verified_rw -= verified_rw

    def committed(self, node: Inode, version: int) -> None:
        """The mount wrote a new version: the kernel's cache holds the writer's bytes,
        unless readers pinned to the version before are open: they went on filling it with
        theirs (the writer went around it, see `file_info`)."""
        st = self.state(node)
        st.cached_version = _MIXED if st.pinned > 0 else version

    def rule_of(self, path: Sequence[bytes]) -> int | str | None:
        """The policy rule a path falls under (an index, None for the default)."""
        if self.gate is None:
            return "none"
        rule = self.gate.policy.rule_at(path)
        return rule.index if rule is not None else None

    def fifo_refusal(self, path: Sequence[bytes]) -> str | None:
        """Why no FIFO may be at `path` (None if one may).

        A FIFO's bytes come from whoever writes into it, and the kernel serves its open
        and reads itself: the daemon is never asked, so nothing is judged. Under an
        enforcing rule that needs signers a FIFO in place of a signed file would hand
        its reader unsigned bytes, so none may be made there or moved there. (Sockets
        cannot be open()ed, and device nodes cannot be used on a nodev mount.)
        """
        if self.gate is None or self.gate.policy.mode is not Mode.ENFORCE:
            return None
        rule = self.gate.policy.rule_at(path)
        if signers_needed(self.gate.policy, rule) == 0:
            return None
        where = rule.label if rule is not None else "default require"
        return (f"{path_text(path)}: no FIFO under {where}: its bytes would reach readers "
                f"unsigned")

    def check_link_move(self, src: Sequence[bytes], dst: Sequence[bytes]) -> None:
        """EXDEV for a hard-linked file crossing a policy rule boundary.

        Its names share one content; a name under a looser rule would read what a
        stricter rule guards. EXDEV makes tools treat the boundary like a filesystem's:
        `mv` falls back to copy (which has to pass open) and `ln` says so.
        """
        if self.gate is not None and self.rule_of(src) != self.rule_of(dst):
            raise pyfuse3.FUSEError(errno.EXDEV)
