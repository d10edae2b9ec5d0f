"""The trust gate at open(), translated for FUSE: verdicts and handle rules to errno,
FileInfo flags and events.

Every decision is made in `annofs.trust`: the verdict for a version under all of a
file's names (`TrustGate.judge_names`), the EXDEV rule for hard links
(`TrustGate.same_rule`), and which handles may be open at once and use the kernel's
page cache (`trust.admission`). This module runs them at the right moment (a deferred
digest hashed in a worker thread; a handle's slots reserved before the open waits for
anything), records refusals in the events log, and answers EACCES, EBUSY or EXDEV.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import lmdb
import pyfuse3
import trio

from annofs.fs.inodes import Inode, NameKey
from annofs.printable import one_line
from annofs.store.records import Version
from annofs.trust.admission import Admission, Busy, CacheState, Claim
from annofs.trust.gate import Judgement, TrustGate
from annofs.trust.nixstore import Caller
from annofs.trust.policy import Mode
from annofs.trust.signing import path_text
from annofs.trust.symlink import Content
from annofs.trust.verdict import Verdict

if TYPE_CHECKING:
    from annofs.explain.report import Explanation

log = logging.getLogger("annofs.fs")

# Called for every refusal and every flagged verdict (allowed only because the mode is
# warn) of a judged open or symlink read: (store path, content, verdict, pid, uid, the
# explanation of a refusal or None). The content is a file's version or a symlink's.
# Plain allowances are passed on only to a sink that asks for them
# (`OpenGuard.every_verdict`: the dashboard's live feed); every open of a signed file is
# one, and the events log records none.
# It returns False for an event it held back (the events log's flood limit, per uid):
# then the daemon log is spared the line too.
VerdictSink = Callable[[str, Content, Verdict, int, int, "Explanation | None"], "bool | None"]
# Explains a refusal of the caller with the given uid, off the event loop; None when it
# chose not to (a rate limit, per uid).
RefusalExplainer = Callable[[Sequence[bytes], Content, Verdict, int],
                            Awaitable["Explanation | None"]]


# Called for refusals that are not verdicts (EBUSY: the handle rules; a FIFO where none
# may be): (store path, pid, uid, reason).
RefusalSink = Callable[[str, int, int, str], "bool | None"]  # False: held back

# Worker threads one uid may keep busy hashing content (a deferred digest: up to 16 GiB
# of a sparse file's zeros). Without a bound per uid, one user opening many such files
# took every worker thread, and everyone else's opens waited behind them.
HASH_THREADS_PER_UID = 2
_HASH_UIDS = 1024  # limiters kept; beyond that, the idle ones are dropped
# Requests of one uid that may wait for its hashing threads at once; one more is EBUSY.
# Each waiting request holds one of the FUSE loop's worker tasks (daemon/mount.py
# FUSE_WORKERS): unbounded, one user's 120 opens of sparse files held all 99 of
# pyfuse3's default, and root's stat waited seconds behind them (SECURITY.md finding 14).
HASH_WAITERS_PER_UID = 64


class UidHashSlots:
    """One uid's hashing threads (HASH_THREADS_PER_UID), refusing with EBUSY a request
    past HASH_WAITERS_PER_UID already waiting for them. Usable as `async with` and as
    `trio.to_thread.run_sync`'s `limiter` (it has acquire_on_behalf_of and
    release_on_behalf_of, as a trio.CapacityLimiter, which cannot be subclassed)."""

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self._limiter = trio.CapacityLimiter(HASH_THREADS_PER_UID)

    @property
    def borrowed_tokens(self) -> int:
        """Threads in use now."""
        return self._limiter.borrowed_tokens

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        """Wait for a thread, or EBUSY when HASH_WAITERS_PER_UID requests already do."""
        if self._limiter.statistics().tasks_waiting >= HASH_WAITERS_PER_UID:
            log.info("uid %d: %d requests already wait for its hashing threads: EBUSY",
                     self.uid, HASH_WAITERS_PER_UID)
            raise pyfuse3.FUSEError(errno.EBUSY)
        await self._limiter.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        """Give the thread back."""
        self._limiter.release_on_behalf_of(borrower)

    async def __aenter__(self) -> None:
        await self.acquire_on_behalf_of(trio.lowlevel.current_task())

    async def __aexit__(self, *exc: object) -> None:
        self.release_on_behalf_of(trio.lowlevel.current_task())


# Names a directory left that are remembered (Inode.left); see OpenGuard.note_move_out.
MAX_LEFT = 16
# A file with more names than this is judged under one name per way of judging them
# (InodeTable.memo_for), and names that many are judged in a worker thread: each costs
# a path's walk and a rule's match, and a file may have any number of hard links.
NAMES_INLINE = 64


class OpenGuard:
    """The gate's word at open(), link and rename, and the page-cache rules that keep it
    true, for the FUSE operations."""

    def __init__(self, gate: TrustGate | None, sink: VerdictSink | None = None,
                 explainer: RefusalExplainer | None = None,
                 refusal_sink: RefusalSink | None = None) -> None:
        self.gate = gate
        self.sink = sink
        self.explainer = explainer
        self.refusal_sink = refusal_sink
        # The sink wants plain allowances too (see VerdictSink).
        self.every_verdict = False
        self.admission = Admission()
        self._hashers: dict[int, UidHashSlots] = {}

    @property
    def active(self) -> bool:
        """Whether opens are judged at all (a policy is loaded and its mode is not off)."""
        return self.gate is not None and self.gate.enforcing

    @property
    def nix_aware(self) -> bool:
        """Whether the policy judges a Nix store (the caller's uid and the file's owner
        then matter: `Caller`)."""
        return self.gate is not None and self.gate.nix is not None

    def content_free(self, paths: Sequence[Sequence[bytes]], caller: Caller) -> bool:
        """`TrustGate.content_free`: an open whose verdict does not depend on the bytes
        (a writer's, in a Nix store path in flight); False without a Nix store."""
        return self.gate is not None and self.gate.content_free(paths, caller)

    def state(self, node: Inode) -> CacheState:
        """The inode's cache state (created on first use)."""
        return self.admission.state(node.ino)

    def forget_ino(self, ino: int) -> None:
        """The inode left the table."""
        self.admission.forget(ino)

    # -- judging -------------------------------------------------------------------------

    def judge_in(self, txn: lmdb.Transaction, paths: Sequence[Sequence[bytes]],
                 version: Version, caller: Caller | None = None) -> Judgement | None:
        """The judgement of `version` under all the file's names, in the read transaction
        the version was read in (no second snapshot, no thread). None if the digest is not
        known yet, or a Nix store path's NAR must be hashed: then `judge` (in a thread).
        `caller`: the caller's uid and the file's owner (`nix_aware` policies only).
        `conclude` acts on the verdict.
        """
        assert self.gate is not None
        return self.gate.judge_names(paths, version, txn, caller=caller)

    def hasher(self, uid: int) -> UidHashSlots:
        """The worker threads `uid` may use to hash content (HASH_THREADS_PER_UID; EBUSY
        past HASH_WAITERS_PER_UID requests waiting for them)."""
        limiter = self._hashers.get(uid)
        if limiter is None:
            if len(self._hashers) >= _HASH_UIDS:
                self._hashers = {u: lim for u, lim in self._hashers.items()
                                 if lim.borrowed_tokens}
            limiter = self._hashers[uid] = UidHashSlots(uid)
        return limiter

    async def ensure_digest(self, version: Version, uid: int) -> Version:
        """`version` with its digest, computed (and recorded) if deferred: in a worker
        thread (not on the event loop) out of `uid`'s own few (`hasher`)."""
        assert self.gate is not None
        if version.digest is not None:
            return version
        return await trio.to_thread.run_sync(self.gate.hashed, version,
                                             limiter=self.hasher(uid))

    async def judge(self, paths: Sequence[Sequence[bytes]], version: Version,
                    uid: int, caller: Caller | None = None) -> tuple[Version, Judgement]:
        """Like `judge_in` for any version: a deferred digest is computed (and recorded)
        first, in one of `uid`'s hashing threads. Returns the version, its digest set,
        and the judgement."""
        assert self.gate is not None
        version = await self.ensure_digest(version, uid)
        if self.nix_aware or len(paths) > NAMES_INLINE:
            # A Nix store path's NAR may have to be hashed (trust/nixstore.py): CPU and
            # I/O over a whole tree, in one of the caller's threads, not on the loop;
            # so are many names (a symlink's in many directories, names in a Nix store).
            judgement = await trio.to_thread.run_sync(
                functools.partial(self.gate.judge_names, paths, version, caller=caller),
                limiter=self.hasher(uid))
        else:
            judgement = self.gate.judge_names(paths, version, caller=caller)
        assert judgement is not None
        return version, judgement

    def guarded(self, paths: Sequence[Sequence[bytes]]) -> bool:
        """Whether a file with these names is under a rule that needs signers."""
        return self.gate is not None and self.gate.needs_signers(paths)

    async def conclude(self, path: Sequence[bytes], version: Content, verdict: Verdict,
                       pid: int, uid: int = 0) -> None:
        """Record the verdict; a refusal is explained first, then raised as EACCES.
        `version` is the content judged: a file's version, or a symlink's (readlink).

        The explanation is made before the caller sees EACCES, so by the time a tool
        reports the failure, the daemon log and the events log say why.
        """
        if verdict.allowed and not verdict.flagged and not self.every_verdict:
            return  # the common case: nothing to record (see VerdictSink)
        text = path_text(path)
        explanation = None
        if not verdict.allowed and self.explainer is not None:
            try:
                explanation = await self.explainer(path, version, verdict, uid)
            except Exception as e:  # the refusal stands; only its explanation is missing
                log.warning("explaining the refusal of %s failed: %s", text, e)
        written = True
        if self.sink is not None:
            try:
                written = self.sink(text, version, verdict, pid, uid, explanation) is not False
            except Exception:
                log.exception("recording the verdict for %s failed", text)
        if verdict.allowed:
            return
        if written:  # held back by the flood limit: not logged either
            if explanation is not None:
                from annofs.explain.report import summary_line
                log.info("pid %d: %s", pid, summary_line(explanation))
            else:
                log.info("refused: %s (pid %d): %s", text, pid, verdict.reason)
        raise pyfuse3.FUSEError(errno.EACCES)  # whatever was recorded

    # -- handles -------------------------------------------------------------------------

    def _busy(self, path: Sequence[bytes], pid: int, uid: int, e: Busy) -> pyfuse3.FUSEError:
        """Record a handle-rule refusal; the EBUSY to raise."""
        self._refused(path_text(path), pid, uid, e.reason)
        return pyfuse3.FUSEError(errno.EBUSY)

    def _refused(self, text: str, pid: int, uid: int, reason: str) -> None:
        """Record a refusal that is not a verdict, and log it unless held back."""
        written = True
        if self.refusal_sink is not None:
            try:
                written = self.refusal_sink(text, pid, uid, reason) is not False
            except Exception:
                log.exception("recording the refusal of %s failed", text)
        if written:
            log.info("refused (uid %d, pid %d): %s: %s", uid, pid, one_line(text),
                     one_line(reason))

    def reserve(self, node: Inode, paths: Sequence[Sequence[bytes]], pid: int, uid: int, *,
                writer: bool, verified_rw: bool, reader: bool = False) -> Claim:
        """Take a handle's (or a truncate's) slots before anything is awaited; EBUSY,
        recorded, if the handle rules forbid it. Give them back with `release`.
        `paths`: the file's names; `reader`: a judged read-only open."""
        try:
            return self.admission.reserve(node.ino, writer=writer, verified_rw=verified_rw,
                                          reader=reader, enforcing=self.active,
                                          guarded=lambda: self.guarded(paths))
        except Busy as e:
            raise self._busy(paths[0], pid, uid, e) from None

    def admit(self, fh: int, node: Inode, claim: Claim, serves: int, path: Sequence[bytes],
              pid: int, uid: int, *, pinned: bool, judged: bool,
              guarded: bool) -> tuple[Claim, pyfuse3.FileInfo]:
        """FileInfo for a reserved handle serving version `serves`, and the claim it holds
        from now on; EBUSY, recorded (the claim must then be released)."""
        try:
            claim, plan = self.admission.admit(node.ino, claim, serves, pinned=pinned,
                                               judged=judged, guarded=guarded)
        except Busy as e:
            raise self._busy(path, pid, uid, e) from None
        return claim, pyfuse3.FileInfo(fh=fh, keep_cache=plan.keep_cache,
                                       direct_io=plan.direct_io)

    def release(self, node: Inode, claim: Claim) -> None:
        """A handle closed (or a truncate or an open ended): its slots are free."""
        self.admission.release(node.ino, claim)

    def committed(self, node: Inode, version: int) -> None:
        """The mount wrote a new version of the file (see `Admission.committed`)."""
        self.admission.committed(node.ino, version)

    # -- names -----------------------------------------------------------------------------

    def fifo_refusal(self, path: Sequence[bytes]) -> str | None:
        """Why no FIFO may be made or reached at `path` (`TrustGate.fifo_refusal`)."""
        return None if self.gate is None else self.gate.fifo_refusal(path)

    def refuse_fifo(self, path: Sequence[bytes], pid: int, uid: int) -> None:
        """EACCES, recorded with its reason, if no FIFO may be at `path`."""
        why = self.fifo_refusal(path)
        if why is None:
            return
        self._refused(path_text(path), pid, uid, why)
        raise pyfuse3.FUSEError(errno.EACCES)

    def name_key(self, symlink: bool) -> tuple[object, NameKey]:
        """The policy in force and `TrustGate.name_key` under it (a names memo's token
        and key: InodeTable.memo_for)."""
        assert self.gate is not None
        return self.gate.policy, self.gate.name_key(symlink)

    def unsettled(self, path: Sequence[bytes], pid: int, uid: int) -> pyfuse3.FUSEError:
        """Record that a file's names kept changing while they were being judged; the
        EBUSY to raise (its names must all be judged: none may be skipped)."""
        self._refused(path_text(path), pid, uid,
                      "busy: its names kept changing while they were being judged")
        return pyfuse3.FUSEError(errno.EBUSY)

    def same_rule(self, src: Sequence[bytes], dst: Sequence[bytes]) -> bool:
        """Whether two names fall under one policy rule (`TrustGate.same_rule`; any two
        do without a policy)."""
        return self.gate is None or self.gate.same_rule(src, dst)

    def same_rules_below(self, src: Sequence[bytes], dst: Sequence[bytes]) -> bool:
        """Whether every name below directory `src` keeps its rule moved to `dst`
        (`Policy.same_rules_below`: a sure True only; any do without a policy)."""
        return self.gate is None or self.gate.policy.same_rules_below(src, dst)

    def fifo_refusal_below(self, d: Sequence[bytes]) -> bool:
        """Whether a FIFO below directory `d` might be refused (`fifo_refusal`; False
        for sure when no name below can need signers: `Policy.signers_below`)."""
        gate = self.gate
        return gate is not None and gate.policy.mode is Mode.ENFORCE and \
            gate.policy.signers_below(d)

    def note_move_out(self, node: Inode, old: Sequence[bytes], new: Sequence[bytes],
                      uid: int) -> bool:
        """Remember on `node` (moved from `old` to `new` by `uid`) the name it left if
        that needs signers and `new` falls under another rule: the kernel resolves a
        path before it sends OPEN, without the name, so an open resolved at `old` may be
        judged after the move, and must still be judged there (`InodeTable.former_paths`).
        One name per rule and mover is enough for a file: the verdict depends on the rule.
        A directory's own path says nothing of the rules of the names below it (a
        carve-out `/src/proj/vendor/**` under `/src/**`, a pattern `/lib/**/*.so`): its
        move is recorded, by path, unless the policy says for sure that every name below
        keeps its rule (`Policy.same_rules_below`), and each open judges the name it would
        have had there. Whether it was recorded (now or before)."""
        if not self.active:
            return False
        if node.is_dir:
            if tuple(old) == tuple(new) or self.same_rules_below(old, new):
                return False  # (within /nix/store/**, say: a build's output moved in)
            if (tuple(old), uid) not in node.left:
                if len(node.left) >= MAX_LEFT:
                    # Bounded (a directory renamed to a million names would hold a million
                    # and every open below would judge them all): the oldest name that is
                    # itself under no rule needing signers goes first.
                    loose = [e for e in node.left if not self.guarded([e[0]])]
                    node.left.remove(loose[0] if loose else node.left[0])
                node.left.append((tuple(old), uid))
            return True
        if self.same_rule(old, new) or not self.guarded([old]):
            return False
        if not any(mover == uid and self.same_rule(path, old) for path, mover in node.left):
            node.left.append((tuple(old), uid))
        return True

    def check_link_move(self, src: Sequence[bytes], dst: Sequence[bytes]) -> None:
        """EXDEV for a hard-linked file crossing a policy rule boundary."""
        if not self.same_rule(src, dst):
            raise pyfuse3.FUSEError(errno.EXDEV)
