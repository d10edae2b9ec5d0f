"""What the filesystem (and `annofs verify`) asks: the verdict for a file's version.

`TrustGate.verdict(path, version)` looks up the rule for the path, the statements
covering the version's content, decides (`verdict.decide_covered`) and caches the
answer. The caller keeps serving the version it asked about: what was verified is what
is read.

The mount asks through a few more questions, so that every trust rule is decided here
and the FUSE layer only translates answers to errno (the handle rules that keep the
kernel's page cache honest are `trust.admission`):

- `judge_names`: the verdict for a version under *every* name of a file (a hard-linked
  file has several; the kernel does not say through which an open came): the strictest
  holds, and whether any name's rule needs signers (`Judgement.guarded`);
- `hashed`: a deferred digest computed first (CPU work: the caller runs it off its loop);
- `needs_signers`: whether a file with these names is guarded (for opens not judged,
  such as write-only ones, which must still keep unjudged bytes out of the page cache);
- `same_rule`: whether a hard-linked file may get a name at another path (EXDEV if not);
- with a policy naming Nix's database (`nix-database`), names under /nix/store are judged
  as Nix registers them (trust/nixstore.py: `nix_verdict` adds that evidence to each
  name's verdict, `content_free` says when a writer's open of a path in flight needs no
  only-writer handle); the caller's uid and the file's owner then matter (`Caller`).

Every open of a file is judged, and most opens are of files not judged before (a build
or a `tar` reads each file once), so the uncached path is the one that must be cheap:

- one read transaction per verdict, the caller's if it has one (open() read the
  version in it): the statement generation and the lookups come from one snapshot, so
  a verdict is never cached under a generation older than the statements it saw;
- the rule per path is remembered by the policy (`Policy.rule_at`);
- verdicts are cached by content digest (identical files at several paths are judged
  once), and by the ids of the statements covering the content: a statement over a
  whole tree makes every file of the tree covered by the same one statement, so
  `decide` runs once for the tree, not once per file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lmdb

from annofs.store.records import Version
from annofs.trust.annotations import AnnotationStore
from annofs.trust.nixstore import STRANGER, Caller, NeedsThread, NixStore, store_names
from annofs.trust.pathglob import path_text
from annofs.trust.policy import Mode, Policy, Rule, signers_needed
from annofs.trust.verdict import Verdict, VerdictCache, decide_covered
from annofs.volume import Volume

if TYPE_CHECKING:
    from annofs.trust.symlink import Symlink


@dataclass(slots=True)
class Judgement:
    """The verdict for a file's version under all its names."""

    path: Sequence[bytes]  # the name whose verdict holds: the first refused, else the first
    verdict: Verdict
    # Some name falls under a rule that needs signers: the file's handles must keep every
    # unjudged byte out of the kernel's page cache (trust.admission).
    guarded: bool


class TrustGate:
    """A policy over a volume's statements, with verdict caches."""

    def __init__(self, vol: Volume, policy: Policy,
                 annotations: AnnotationStore | None = None,
                 cache: VerdictCache | None = None) -> None:
        self._vol = vol
        self.policy = policy
        self.annotations = annotations or AnnotationStore(vol.store)
        # (digest, rule) under (policy, statement generation): a new statement anywhere
        # may cover any content, so every entry goes when the statements change.
        self.cache = cache or VerdictCache()
        # (statement ids, rule) under the policy generation only: an id is a content
        # address (BLAKE3 of what was signed), so the verdict it leads to cannot change
        # while the policy stays; other processes' signing leaves these entries valid.
        self.by_statements = VerdictCache(maxsize=4096)
        # The host mountpoint's components, when a mount serves this gate: an absolute
        # symlink target into the mount is then judged where it lands (trust.symlink).
        self.mountpoint: tuple[bytes, ...] | None = None
        # The store-aware part (trust/nixstore.py) when the policy names Nix's database:
        # names under /nix/store are then judged as Nix registers them.
        self.nix: NixStore | None = (NixStore(vol, policy.nix_database)
                                     if policy.nix_database else None)

    @property
    def volume(self) -> Volume:
        """The volume whose statements and versions this gate reads."""
        return self._vol

    @property
    def enforcing(self) -> bool:
        """False when the policy's mode is off: open() need not ask at all."""
        return self.policy.mode is not Mode.OFF

    def set_policy(self, policy: Policy) -> None:
        """Switch to a reloaded policy (SIGHUP, `annofs policy reload`)."""
        self.policy = policy
        self.cache.clear()
        self.by_statements.clear()
        if policy.nix_database != (self.nix.db.path if self.nix is not None else None):
            self.nix = NixStore(self._vol, policy.nix_database) if policy.nix_database else None

    def verdict(self, path: Sequence[bytes], version: Version | Symlink,
                txn: lmdb.Transaction | None = None) -> Verdict:
        """The verdict for `version` read at store path `path` (a list of names); a
        symlink's content (trust/symlink.py) is judged like a file's.

        `txn`: a read transaction to look the statements up in (the one the version was
        read in); only for a version whose digest is known. Without one, a deferred
        digest is computed and recorded first (CPU work over the whole content: call it
        from a worker thread for large files).
        """
        if version.digest is None:
            assert isinstance(version, Version)  # a symlink's digest is always known
            if txn is not None:
                raise ValueError("verdict in a caller's transaction needs a known digest")
            version = self._vol.versions.ensure_digest(version)
        assert version.digest is not None
        policy = self.policy  # one policy for the whole decision, even if reloaded meanwhile
        rule = policy.rule_at(path)
        if txn is not None:
            return self._verdict(txn, policy, rule, version.digest)
        with self._vol.store.read() as txn:
            return self._verdict(txn, policy, rule, version.digest)

    def _verdict(self, txn: lmdb.Transaction, policy: Policy, rule: Rule | None,
                 digest: bytes) -> Verdict:
        index = rule.index if rule is not None else None
        generation = self.annotations.generation(txn)
        # An SSH key's valid-before passing changes verdicts: it is part of the key.
        now = time.time()
        pgen = policy.cache_generation(now)
        hit = self.cache.get(digest, index, pgen, generation)
        if hit is not None:
            return hit
        statements = self.annotations.covering(txn, digest)
        labels = policy.labels.get(digest, ())  # the trust bundle's, by content
        ids: tuple[object, ...] = tuple([ss.id for ss in statements])  # one key per set
        if labels:
            ids = (*ids, labels)
        result = self.by_statements.get(ids, index, pgen, 0)
        if result is None:
            result = decide_covered(policy, rule, statements, labels, now)
            self.by_statements.put(ids, index, pgen, 0, result)
        self.cache.put(digest, index, pgen, generation, result)
        return result

    # -- the questions the mount asks ------------------------------------------------------

    def hashed(self, version: Version) -> Version:
        """`version` with its digest computed and recorded if it was deferred (CPU work over
        the whole content: call it off the event loop)."""
        if version.digest is not None:
            return version
        return self._vol.versions.ensure_digest(version)

    def judge_names(self, paths: Sequence[Sequence[bytes]], version: Version,
                    txn: lmdb.Transaction | None = None, *,
                    caller: Caller | None = None) -> Judgement | None:
        """The strictest verdict for `version` under each of its names `paths` (at least one).

        In `txn` if given (one snapshot with the version); then None when the digest is not
        known yet (`hashed` first, then ask again without a transaction). The first name's
        verdict holds unless another name refuses. `caller`: who opens (uid, and the
        file's owner), for names in a Nix store (`nix_verdict`); None: a stranger. In
        `txn`, None too when a Nix store path's NAR must be hashed first (ask again
        without a transaction, off the event loop).
        """
        if version.digest is None:
            if txn is not None:
                return None
            raise ValueError("judge_names needs a known digest: call hashed() first")
        if self.nix is not None:
            if txn is None:
                with self._vol.store.read() as own:
                    return self._judge_nix(own, paths, version, caller or STRANGER)
            try:
                return self._judge_nix(txn, paths, version, caller or STRANGER,
                                       may_hash=False)
            except NeedsThread:
                return None
        if txn is None:
            with self._vol.store.read() as own:
                return self._judge_names(own, paths, version.digest)
        return self._judge_names(txn, paths, version.digest)

    def _judge_names(self, txn: lmdb.Transaction, paths: Sequence[Sequence[bytes]],
                     digest: bytes) -> Judgement:
        policy = self.policy  # one policy for every name, even if reloaded meanwhile
        first = paths[0]
        verdict = self._verdict(txn, policy, policy.rule_at(first), digest)
        guarded = verdict.needed > 0
        for other in paths[1:]:
            if not verdict.allowed:
                break
            other_verdict = self._verdict(txn, policy, policy.rule_at(other), digest)
            guarded = guarded or other_verdict.needed > 0
            if not other_verdict.allowed:
                return Judgement(other, other_verdict, True)
        return Judgement(first, verdict, guarded or not verdict.allowed)

    def nix_verdict(self, txn: lmdb.Transaction | None, path: Sequence[bytes],
                    content: Version | Symlink, verdict: Verdict,
                    caller: Caller | None = None) -> Verdict:
        """`verdict` for `content` at `path` with what Nix's database says, when the
        policy names one (trust/nixstore.py: it adds evidence, never refuses more)."""
        if self.nix is None:
            return verdict
        return self.nix.adjust(txn, self.policy, self.policy.rule_at(path), path, content,
                               verdict, caller or STRANGER)

    def content_free(self, paths: Sequence[Sequence[bytes]], caller: Caller) -> bool:
        """Whether `caller`'s open of a file with these names is allowed whatever its
        content: every name is in a Nix store path in flight that `caller` writes
        (`NixStore.writer_in_flight`). Such a read-write handle need not be the file's
        only writer (trust.admission): nothing it reads was judged on its bytes. Nix
        opens its `.lock` files so, from every process working on that path at once."""
        if self.nix is None:
            return False
        return all(self.nix.writer_in_flight(p, caller) for p in store_names(paths))

    def verdict_as(self, path: Sequence[bytes], version: Version, caller: Caller
                   ) -> Verdict:
        """`verdict` as `caller` would get it at open (a Nix store's evidence included):
        what `user.annofs.status` and `.why` show. May hash: not on the event loop."""
        return self.nix_verdict(None, path, version, self.verdict(path, version), caller)

    def _judge_nix(self, txn: lmdb.Transaction, paths: Sequence[Sequence[bytes]],
                   version: Version, caller: Caller, *, may_hash: bool = True
                   ) -> Judgement:
        """`_judge_names` with the Nix store's evidence (`nix_verdict`) for each name; a
        `.links` name only counts when the file has no other (nixstore.store_names)."""
        assert self.nix is not None and version.digest is not None
        policy = self.policy
        names = list(store_names(paths))
        first = names[0]
        judged: list[tuple[Sequence[bytes], Verdict]] = []
        for p in names:
            rule = policy.rule_at(p)
            base = self._verdict(txn, policy, rule, version.digest)
            v = self.nix.adjust(txn, policy, rule, p, version, base, caller,
                                may_hash=may_hash)
            judged.append((p, v))
            if not v.allowed:
                return Judgement(p, v, True)
        guarded = any(v.needed > 0 for _p, v in judged)
        return Judgement(first, judged[0][1], guarded)

    def needs_signers(self, paths: Sequence[Sequence[bytes]]) -> bool:
        """Whether any of a file's names falls under a rule that needs signers (the
        default's too), in a policy that is not off."""
        policy = self.policy
        if policy.mode is Mode.OFF:
            return False
        return any(signers_needed(policy, policy.rule_at(path)) > 0 for path in paths)

    def fifo_refusal(self, path: Sequence[bytes]) -> str | None:
        """Why no FIFO may be reached or made at `path` (None if one may).

        A FIFO's bytes come from whoever writes into it, and the kernel serves its open
        and reads itself: nothing is asked, so nothing can be judged. Under an enforcing
        rule that needs signers a FIFO in place of a signed file would hand its reader
        unsigned bytes, so none may be made or moved there, and one already there (made
        while the policy was off, or imported) is not found. (Sockets cannot be
        open()ed, and device nodes cannot be used on a nodev mount.)
        """
        policy = self.policy
        if policy.mode is not Mode.ENFORCE:
            return None
        rule = policy.rule_at(path)
        if signers_needed(policy, rule) == 0:
            return None
        where = rule.label if rule is not None else "default require"
        return (f"{path_text(path)}: a FIFO under {where}: its bytes would reach readers "
                f"unsigned")

    def name_key(self, symlink: bool = False) -> Callable[[Sequence[bytes]], Hashable]:
        """What the verdict at a name depends on besides the content, under the policy
        now in force: names with equal keys get one verdict for any content, so a file
        of many names is judged under one name per key (the strictest still holds). The
        rule, for a file; for a symlink also its directory (a relative target lands from
        there: trust/symlink.py); the whole name in a Nix store (evidence per store
        path and file: trust/nixstore.py)."""
        policy = self.policy
        nix = self.nix is not None

        def key(path: Sequence[bytes]) -> Hashable:
            rule = policy.rule_at(path)
            index = rule.index if rule is not None else None
            if nix and NixStore.covers(path):
                return index, tuple(path)
            if symlink:
                return index, tuple(path[:-1])
            return index

        return key

    def rule_of(self, path: Sequence[bytes]) -> int | None:
        """The policy rule a path falls under (its index; None for the default)."""
        rule = self.policy.rule_at(path)
        return rule.index if rule is not None else None

    def same_rule(self, src: Sequence[bytes], dst: Sequence[bytes]) -> bool:
        """Whether a hard-linked file named `src` may also (or instead) be named `dst`.

        Its names share one content; a name under a looser rule would read what a stricter
        rule guards. So a link or rename of one never crosses a rule boundary (the mount
        answers EXDEV: tools treat the boundary like a filesystem's, `mv` copies, which has
        to pass open, and `ln` says so).
        """
        return self.rule_of(src) == self.rule_of(dst)
