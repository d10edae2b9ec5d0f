"""Finding the signed original of a file: what it was, or was copied from, before it changed.

Three ways, tried in this order (SPEC §5, issue 6):

1. EDIT_GRAPH: the nearest ancestor version whose content a statement covers (the file
   was edited in place, or a copy of a signed file was patched: copies share versions).
2. SHARED_FRAGMENTS: the signed contents sharing the most bytes with it, through the
   `signed_fragments` index (fragment -> signed digests). Only the file's own fragments
   are looked up, never all signed files; a fragment held by very many signed contents
   (zeros, a licence header) says nothing about which one is the original and is skipped.
3. TREE_PATH: a statement over a tree that covers a file near this one (a sibling, or a
   file in a parent directory) gives the subject name this file would have had in it; the
   subject under that name is the original (the file was rewritten completely). With no
   signed neighbour (a lone signed file rewritten by `sed -i`: a new file renamed over
   it), the statements' subject names alone: a subject named by the longest tail of this
   file's path (`proj/main.c`, else `main.c`), newest statement first.

The first way that finds something gives the original; the other candidates of ways 1
and 2 follow, ranked by shared bytes. Way 3 is asked only when those found nothing.

To diff, the original's bytes are needed: the
`version_digests` index (digest + version id, filled where versions get digests) finds a
stored version with that content. Entries can be stale (gc removes versions and leaves
them), so each is checked. A statement imported without its content has no version: the
candidate is still reported, without a diff.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb

from annofs.content.versions import EMPTY_VERSION
from annofs.errors import AnnofsError
from annofs.store.keys import HASH_SIZE, u64
from annofs.store.records import HOLE, Version
from annofs.trust.annotations import AnnotationStore
from annofs.trust.policy import Policy, statement_signer
from annofs.trust.signing import path_text
from annofs.trust.statement import SignedStatement, symlink_digest
from annofs.trust.symlink import Content
from annofs.trust.verdict import decide
from annofs.volume import Volume

EDIT_GRAPH = "edit graph"
SHARED_FRAGMENTS = "shared fragments"
TREE_PATH = "signed tree path"
_WAY_ORDER = {EDIT_GRAPH: 0, SHARED_FRAGMENTS: 1, TREE_PATH: 2}

# Bounds that keep an explanation interactive in a store of any size.
MAX_ANCESTORS = 10_000  # versions walked back along the edit graph
COMMON_FRAGMENT = 64  # a fragment in more signed contents than this is not evidence
MAX_CANDIDATES = 5
TREE_ENTRIES_PER_DIR = 64  # files looked at in each parent directory (way 3)
MAX_NAME_SCAN = 1_000_000  # signed (digest, statement) entries read for way 3 by name


@dataclass(frozen=True)
class Signature:
    """One statement over the original's content."""

    statement_id: bytes
    signer: str  # the name the policy gives the key, else the statement's
    trusted: bool
    claim: str
    label: str | None
    time: int  # seconds since the epoch
    names: tuple[str, ...]  # subject names the original has in it (the signed path)


@dataclass(frozen=True)
class Candidate:
    """A signed content that this file may be a changed copy of."""

    digest: bytes
    how: str  # EDIT_GRAPH, SHARED_FRAGMENTS or TREE_PATH
    version: Version | None  # a stored version with this content; None: content not here
    shared_bytes: int
    shared_fragments: int
    signatures: tuple[Signature, ...]
    trusted_signers: tuple[str, ...]  # keys that count for the rule at this file's path
    satisfies: bool  # the original would be allowed at this path
    distance: int | None = None  # edits back along the graph (EDIT_GRAPH only)
    symlink: bool = False  # the signed content is a symlink's (its statements say so)
    withheld: bool = False  # reduced for a caller who may not read it (explain.visibility)

    @property
    def size(self) -> int | None:
        """The original's size, if its content is stored."""
        return self.version.size if self.version is not None else None


def _counts(v: Version) -> tuple[Counter[bytes], dict[bytes, int]]:
    counts: Counter[bytes] = Counter()
    lengths: dict[bytes, int] = {}
    h = v.hashes
    for i in range(v.count):
        key = bytes(h[i * HASH_SIZE:(i + 1) * HASH_SIZE])
        if key == HOLE:
            continue  # zeros every sparse file has: not a sign of a common origin
        counts[key] += 1
        lengths[key] = v.lengths[i]
    return counts, lengths


def shared(a: Version, b: Version) -> tuple[int, int]:
    """(bytes, fragments) the two contents share: their fragment multisets' intersection."""
    ca, la = _counts(a)
    cb, _ = _counts(b)
    common = ca & cb
    return sum(n * la[h] for h, n in common.items()), sum(common.values())


def version_ids_for_digest(vol: Volume, txn: lmdb.Transaction, digest: bytes) -> list[int]:
    """Ids of versions indexed with content `digest`, oldest first (may be stale: gc)."""
    db = vol.store.db["version_digests"]
    found: list[int] = []
    with txn.cursor(db=db) as cur:
        if cur.set_range(digest):
            for key in cur.iternext(values=False):
                if key[:HASH_SIZE] != digest:
                    break
                found.append(int.from_bytes(key[HASH_SIZE:], "big"))
    return found


def version_for_digest(vol: Volume, txn: lmdb.Transaction, digest: bytes) -> Version | None:
    """A stored version whose content has `digest` (the newest of them), or None."""
    found = version_ids_for_digest(vol, txn, digest)
    for vid in reversed(found):
        raw = txn.get(u64(vid), db=vol.store.db["versions"])
        if raw is None:
            continue  # removed by gc; the index entry is stale
        v = vol.versions.get(txn, vid)
        if v.digest == digest:
            return v
    return None


class _Finder:
    def __init__(self, vol: Volume, ann: AnnotationStore, txn: lmdb.Transaction,
                 version: Content, path: Sequence[bytes], policy: Policy | None) -> None:
        self.vol, self.ann, self.txn = vol, ann, txn
        self.version, self.path, self.policy = version, tuple(path), policy
        self._signed: dict[bytes, bool] = {}

    def signed(self, digest: bytes) -> bool:
        s = self._signed.get(digest)
        if s is None:
            s = self._signed[digest] = self.ann.is_signed(self.txn, digest)
        return s

    # -- way 1 ------------------------------------------------------------------------------

    def by_edit_graph(self) -> list[tuple[bytes, int]]:
        """[(digest, distance)] of the nearest signed ancestor."""
        seen = {self.version.id}
        vid, distance = self.version.parent, 0
        if self.version.id == EMPTY_VERSION:
            return []
        while vid != EMPTY_VERSION and vid not in seen and distance < MAX_ANCESTORS:
            seen.add(vid)
            distance += 1
            try:
                v = self.vol.versions.get(self.txn, vid)
            except AnnofsError:
                return []  # a damaged graph: fsck's to report; the other ways still work
            if v.digest is not None and v.digest != self.version.digest \
                    and self.signed(v.digest):
                return [(v.digest, distance)]
            vid = v.parent
        return []

    # -- way 2 ------------------------------------------------------------------------------

    def by_fragments(self) -> list[bytes]:
        """Signed digests sharing the most bytes, best first."""
        counts, lengths = _counts(self.version)
        db = self.vol.store.db["signed_fragments"]
        score: Counter[bytes] = Counter()
        with self.txn.cursor(db=db) as cur:
            for h, n in counts.items():
                if not cur.set_range(h):
                    continue
                holders: list[bytes] = []
                for key in cur.iternext(values=False):
                    if key[:HASH_SIZE] != h:
                        break
                    holders.append(bytes(key[HASH_SIZE:]))
                    if len(holders) > COMMON_FRAGMENT:
                        break
                if len(holders) > COMMON_FRAGMENT:
                    continue
                for d in holders:
                    score[d] += n * lengths[h]
        out = []
        for d, _ in score.most_common():
            if d == self.version.digest or not self.signed(d):
                continue  # itself, or no statement signs it any more
            out.append(d)
            if len(out) >= MAX_CANDIDATES:
                break
        return out

    # -- way 3 ------------------------------------------------------------------------------

    def by_tree_path(self) -> list[bytes]:
        """Digests signed under this file's name in a tree statement covering a neighbour."""
        ns, txn, path = self.vol.namespace, self.txn, self.path
        subjects: dict[bytes, dict[str, bytes]] = {}
        found: list[bytes] = []
        for k in range(len(path) - 1, -1, -1):
            try:
                d = ns.resolve(txn, path[:k])
            except AnnofsError:
                continue
            if not d.is_dir:
                continue
            looked = 0
            for name, a, _link in ns.iter_entries(txn, int(d.target)):
                if not (a.is_reg or a.is_symlink) or (k == len(path) - 1
                                                      and name == path[-1]):
                    continue
                looked += 1
                if looked > TREE_ENTRIES_PER_DIR:
                    break
                # A signed symlink beside it is as good a witness as a signed file.
                nd = (symlink_digest(a.target) if isinstance(a.target, bytes)
                      else self.vol.versions.get(txn, int(a.target)).digest)
                if nd is None or not self.signed(nd):
                    continue
                here = (*path[:k], name)
                for sid in self.ann.ids_for_digest(txn, nd):
                    for sub_name in self.ann.names_for(txn, nd, sid):
                        rel = _rel_name(here, sub_name, path)
                        if rel is None:
                            continue
                        if sid not in subjects:
                            ss = self.ann.get(txn, sid)
                            subjects[sid] = {s.name: s.digest for s in ss.statement.subjects}
                        got = subjects[sid].get(rel)
                        if got is not None and got != self.version.digest \
                                and got not in found:
                            found.append(got)
            if found:
                return found  # the nearest directory that says anything decides
        return self.by_subject_name()

    def by_subject_name(self) -> list[bytes]:
        """Digests signed under a subject name that is a tail of this file's path.

        No index maps names to statements, so the `signed_digests` entries (digest +
        statement id -> subject names) are read, up to MAX_NAME_SCAN of them; an entry's
        names are decoded only if they hold this file's base name. The longest matching
        tail wins (`proj/main.c` says more than `main.c`), then the newest statement.
        """
        if not self.path:
            return []
        base = self.path[-1]
        tails = {"/".join(p.decode("utf-8", "backslashreplace") for p in self.path[-k:]): k
                 for k in range(1, len(self.path) + 1)}
        best: dict[bytes, tuple[int, int]] = {}  # digest -> (tail length, statement time)
        db = self.vol.store.db["signed_digests"]
        with self.txn.cursor(db=db) as cur:
            for n, (key, raw) in enumerate(cur.iternext()):
                if n >= MAX_NAME_SCAN:
                    break
                raw = bytes(raw)
                if base not in raw:
                    continue
                digest = bytes(key[:HASH_SIZE])
                if digest == self.version.digest:
                    continue
                names = raw.decode("utf-8", "replace").split("\0")
                k = max((tails.get(name, 0) for name in names), default=0)
                if not k:
                    continue
                when = self.ann.summary(self.txn, bytes(key[HASH_SIZE:])).time
                if (k, when) > best.get(digest, (0, 0)):
                    best[digest] = (k, when)
        return sorted(best, key=lambda d: best[d], reverse=True)

    # -- putting it together -----------------------------------------------------------------

    def candidate(self, digest: bytes, how: str, distance: int | None) -> Candidate:
        txn, policy = self.txn, self.policy
        v = version_for_digest(self.vol, txn, digest)
        if v is not None and isinstance(self.version, Version):
            sb, sf = shared(self.version, v)
        else:
            sb, sf = 0, 0
        statements: list[SignedStatement] = self.ann.for_digest(txn, digest)
        sigs = []
        for ss in statements:
            st = ss.statement
            trusted = policy is not None and policy.trusts_key_of(st) \
                and st.public_key not in policy.revoked and ss.signature_valid
            shown = statement_signer(policy, ss)
            sigs.append(Signature(ss.id, shown, trusted, st.claim, st.label, st.time,
                                  tuple(self.ann.names_for(txn, digest, ss.id))))
        if policy is not None:
            verdict = decide(path_text(self.path), digest, policy, statements)
            signers, ok = verdict.signers, verdict.satisfied
        else:
            signers, ok = (), False
        symlink = any(s.symlink for ss in statements for s in ss.statement.subjects
                      if s.digest == digest)
        return Candidate(digest, how, v, sb, sf, tuple(sigs), signers, ok, distance, symlink)


def _rel_name(here: Sequence[bytes], sub_name: str, path: Sequence[bytes]) -> str | None:
    """The subject name `path` has in a statement that names the file at `here` `sub_name`."""
    comps = [c.encode("utf-8", "surrogateescape") for c in sub_name.split("/")]
    if len(comps) > len(here) or list(here[len(here) - len(comps):]) != comps:
        return None
    prefix = len(here) - len(comps)
    if tuple(path[:prefix]) != tuple(here[:prefix]) or len(path) <= prefix:
        return None
    return "/".join(p.decode("utf-8", "backslashreplace") for p in path[prefix:])


def find_original(vol: Volume, annotations: AnnotationStore, version: Content,
                  path: Sequence[bytes], policy: Policy | None,
                  txn: lmdb.Transaction | None = None) -> list[Candidate]:
    """Candidates for the signed original of `version` (read at store path `path`).

    The first is the original (by the first way that found any); the rest follow by
    shared bytes. Empty: no signed original anywhere. `version` should have its digest.
    A symlink (no edit graph, no fragments) is looked for by the signed tree path only.
    """
    if txn is None:
        with vol.store.read() as t:
            return find_original(vol, annotations, version, path, policy, t)
    f = _Finder(vol, annotations, txn, version, path, policy)
    found: dict[bytes, tuple[str, int | None]] = {}
    if isinstance(version, Version):
        for d, dist in f.by_edit_graph():
            found.setdefault(d, (EDIT_GRAPH, dist))
        for d in f.by_fragments():
            found.setdefault(d, (SHARED_FRAGMENTS, None))
    if not found:
        for d in f.by_tree_path():
            found.setdefault(d, (TREE_PATH, None))
    cands = [f.candidate(d, how, dist) for d, (how, dist) in found.items()]
    if not cands:
        return []
    best = min(cands, key=lambda c: (_WAY_ORDER[c.how], -c.shared_bytes))
    rest = sorted((c for c in cands if c is not best),
                  key=lambda c: (-c.shared_bytes, _WAY_ORDER[c.how], c.digest))
    return [best, *rest[:MAX_CANDIDATES - 1]]
